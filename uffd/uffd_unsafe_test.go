package uffd

import (
	"bytes"
	"errors"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const page = 4096

func kernelAtLeast(t *testing.T, major, minor int) bool {
	var u unix.Utsname
	unix.Uname(&u)
	f := strings.FieldsFunc(unix.ByteSliceToString(u.Release[:]), func(r rune) bool { return r < '0' || r > '9' })
	ma, _ := strconv.Atoi(f[0])
	mi, _ := strconv.Atoi(f[1])
	return ma > major || ma == major && mi >= minor
}

// need opens a userfaultfd with features, skipping only when the kernel is
// too old to have them and failing when it should.
func need(t *testing.T, features uint64, major, minor int) *FD {
	t.Helper()
	u, err := Open(features)
	if err != nil {
		if errors.Is(err, ErrNotSupported) || errors.Is(err, unix.ENOSYS) {
			if kernelAtLeast(t, major, minor) {
				t.Fatalf("Linux >= %d.%d should support userfaultfd features %#x: %v", major, minor, features, err)
			}
			t.Skipf("kernel lacks userfaultfd features %#x: %v", features, err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	return u
}

func mmap(t *testing.T, pages int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, pages*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func base(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

// noGC keeps the collector off for a test whose own goroutine blocks in a
// userfaultfd fault: such a goroutine cannot be preempted, so a
// stop-the-world would wait for it forever. (Faults served by ferry come
// from other processes and are not affected.)
func noGC(t *testing.T) {
	old := debug.SetGCPercent(-1)
	t.Cleanup(func() { debug.SetGCPercent(old) })
}

// waitMsg polls u until a message arrives, without allocating.
func waitMsg(t *testing.T, u *FD) Msg {
	t.Helper()
	buf := make([]byte, 16*MsgSize)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		ms, err := u.ReadMsgs(buf)
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) > 0 {
			return ms[0]
		}
		time.Sleep(100 * time.Microsecond)
	}
	t.Fatal("no userfaultfd message within 5s")
	return Msg{}
}

func TestHandshakeFeatures(t *testing.T) {
	got, err := Supported()
	if err != nil {
		t.Fatal(err)
	}
	if kernelAtLeast(t, 6, 7) && got&FeatureWPAsync == 0 {
		t.Fatalf("features %#x lack WP_ASYNC on a 6.7+ kernel", got)
	}
	t.Logf("userfaultfd features %#x", got)
}

func TestMissingCopyAndZeroPage(t *testing.T) {
	noGC(t)
	u := need(t, 0, 4, 3)
	mem := mmap(t, 4)
	if _, err := u.Register(base(mem), uint64(len(mem)), RegisterMissing); err != nil {
		t.Fatal(err)
	}
	// Fault inside a syscall (write copies from the registered page): the
	// runtime then hands the goroutine's P to others while it waits. A
	// plain load would hold the P, and with it this goroutine's timers.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	got := make(chan byte)
	go func() {
		unix.Write(p[1], mem[page+7:page+8]) // faults on page 1
		var b [1]byte
		unix.Read(p[0], b[:])
		got <- b[0]
	}()
	m := waitMsg(t, u)
	if m.Event != EventPagefault || m.Address&^(page-1) != base(mem)+page {
		t.Fatalf("got %v, want a fault on page 1 (%#x)", m, base(mem)+page)
	}
	src := bytes.Repeat([]byte{0x5a}, page)
	if n, err := u.Copy(base(mem)+page, src, false); err != nil || n != page {
		t.Fatalf("copy: %d, %v", n, err)
	}
	select {
	case v := <-got:
		if v != 0x5a {
			t.Fatalf("read %#x after UFFDIO_COPY, want 0x5a", v)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("faulting reader not woken")
	}
	if _, err := u.Copy(base(mem)+page, src, false); !errors.Is(err, ErrExist) {
		t.Fatalf("second copy onto the same page: %v, want EEXIST", err)
	}
	if err := u.ZeroPage(base(mem)+2*page, page); err != nil {
		t.Fatal(err)
	}
	if mem[2*page+100] != 0 {
		t.Fatal("zero page not zero")
	}
	if ms, _ := u.ReadMsgs(nil); len(ms) != 0 {
		t.Fatalf("unexpected messages after ZEROPAGE: %v", ms)
	}
}

func TestWPAsyncScan(t *testing.T) {
	u := need(t, FeatureWPAsync, 6, 7)
	mem := mmap(t, 64)
	for i := 0; i < 64; i++ {
		mem[i*page] = 1
	}
	start, end := base(mem), base(mem)+uint64(len(mem))
	if _, err := u.Register(start, end-start, RegisterWP); err != nil {
		t.Fatal(err)
	}
	if err := u.WriteProtect(start, end-start, true); err != nil {
		t.Fatal(err)
	}
	s, err := OpenScanner(0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	scan := func() []Region {
		t.Helper()
		rs, err := s.Scan(start, end, Written)
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	if rs := scan(); len(rs) != 0 {
		t.Fatalf("written right after protecting: %v", rs)
	}
	for _, i := range []int{3, 10, 11, 12} {
		mem[i*page+9] = 2
	}
	rs := scan()
	want := []Region{{start + 3*page, start + 4*page, PageWritten}, {start + 10*page, start + 13*page, PageWritten}}
	if len(rs) != 2 || rs[0] != want[0] || rs[1] != want[1] {
		t.Fatalf("written regions %v, want %v", rs, want)
	}
	if rs := scan(); len(rs) != 0 {
		t.Fatalf("the scan did not re-arm protection: %v", rs)
	}
	mem[5*page] = 3
	if rs := scan(); len(rs) != 1 || rs[0].Start != start+5*page || Pages(rs) != 1 {
		t.Fatalf("after one write: %v", rs)
	}
	// No message: async write-protect faults are resolved by the kernel.
	if ms, _ := u.ReadMsgs(nil); len(ms) != 0 {
		t.Fatalf("async WP produced messages: %v", ms)
	}
}

func TestScanContinuesPastFullBuffer(t *testing.T) {
	mem := mmap(t, 256)
	for i := 0; i < 256; i += 2 {
		mem[i*page] = 1
	}
	s, err := OpenScanner(0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.vec = make([]Region, 5) // force many continuations
	rs, err := s.Scan(base(mem), base(mem)+uint64(len(mem)), Query{AnyOf: PagePresent, ReturnMask: PagePresent})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 128 {
		t.Fatalf("%d regions, want 128", len(rs))
	}
	for i, r := range rs {
		if r.Start != base(mem)+uint64(2*i)*page || r.End != r.Start+page {
			t.Fatalf("region %d: %#x-%#x", i, r.Start, r.End)
		}
	}
}

func TestEvents(t *testing.T) {
	noGC(t)
	// REMAP is exercised against another process with lazy pages: an
	// in-process mremap waiting on its own event does not return here.
	u := need(t, FeatureEventRemove|FeatureEventUnmap, 4, 11)
	b, err := unix.Mmap(-1, 0, 8*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	start := base(b)
	for i := 0; i < 8; i++ {
		b[i*page] = 1
	}
	if _, err := u.Register(start, 8*page, RegisterMissing); err != nil {
		t.Fatal(err)
	}
	// These calls wait until the monitor has read their event.
	done := make(chan error, 1)
	go func() { done <- unix.Madvise(b[:2*page], unix.MADV_DONTNEED) }()
	if m := waitMsg(t, u); m.Event != EventRemove || m.Start != start || m.End != start+2*page {
		t.Fatalf("madvise: got %v", m)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _, e := unix.Syscall(unix.SYS_MUNMAP, uintptr(start), 4*page, 0)
		if e != 0 {
			done <- e
			return
		}
		done <- nil
	}()
	if m := waitMsg(t, u); m.Event != EventUnmap || m.Start != start || m.End != start+4*page {
		t.Fatalf("munmap: got %v", m)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := u.Unregister(start+4*page, 4*page); err != nil {
		t.Fatal(err)
	}
	unix.Syscall(unix.SYS_MUNMAP, uintptr(start+4*page), 4*page, 0)
}

func TestDecodeMsgRejectsGarbage(t *testing.T) {
	if _, err := DecodeMsg(make([]byte, 10)); err == nil {
		t.Fatal("short message accepted")
	}
	b := make([]byte, MsgSize)
	b[0] = 0x7f
	if _, err := DecodeMsg(b); err == nil {
		t.Fatal("unknown event accepted")
	}
}

func TestCloseIdempotent(t *testing.T) {
	u := need(t, 0, 4, 3)
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	_ = os.Getpid
}
