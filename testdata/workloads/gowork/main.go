// gowork: a Go workload for checkpoint/restore tests. Many goroutines on
// several OS threads, tickers, channel ping-pong and signal.Notify; a
// random token kept only in memory; on SIGUSR1 it verifies a large slice
// and writes a report (key=value lines, atomic rename) to the path given
// as its last argument.
package main

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	report := os.Args[len(os.Args)-1]
	runtime.GOMAXPROCS(4)
	var tb [8]byte
	rand.Read(tb[:])
	token := binary.LittleEndian.Uint64(tb[:])
	data := make([]uint64, 4<<20)
	for i := range data {
		data[i] = token ^ uint64(i)*0x9e3779b97f4a7c15
	}
	var ticks, pongs atomic.Int64
	for i := 0; i < 16; i++ {
		go func() {
			t := time.NewTicker(time.Millisecond)
			for range t.C {
				ticks.Add(1)
			}
		}()
	}
	for i := 0; i < 8; i++ {
		ping, pong := make(chan int), make(chan int)
		go func() {
			for v := range ping {
				pong <- v + 1
			}
		}()
		go func() {
			v := 0
			for {
				ping <- v
				v = <-pong
				pongs.Add(1)
				if v%1000 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
		}()
	}
	var seq int64
	write := func() {
		seq++
		status, reason := "ok", ""
		for i := range data {
			if data[i] != token^uint64(i)*0x9e3779b97f4a7c15 {
				status, reason = "fail", fmt.Sprintf("data[%d] differs", i)
				break
			}
		}
		s := fmt.Sprintf("status=%s\npid=%d\ntoken=%016x\ncounter=%d\npongs=%d\ngoroutines=%d\nseq=%d\n",
			status, os.Getpid(), token, ticks.Load(), pongs.Load(), runtime.NumGoroutine(), seq)
		if reason != "" {
			s += "reason=" + reason + "\n"
		}
		os.WriteFile(report+".tmp", []byte(s), 0o644)
		os.Rename(report+".tmp", report)
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1)
	write()
	for range ch {
		write()
	}
}
