package vmflags

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
)

// CacheFile keeps what Prepare found (offsets, the flags' names) for the
// next ferry process of the same boot: finding it costs ~4 ms, more with
// the CPUs busy, and a dump waits for it; loading the program alone costs
// ~0.3 ms. A running kernel does not change, so the boot's id is the key.
const CacheFile = "/run/ferry/vmflags.json"

type cache struct {
	BootID                         string           `json:"boot_id"`
	IterFunc, Start, End, FlagsOff uint32           `json:",omitempty"`
	Names                          map[uint8]string `json:"names"` // vm_flags bit: smaps' name
	Gate                           []string         `json:"gate,omitempty"`
}

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func newCache(boot string, ki kernelInfo, n names, gate []string) *cache {
	c := &cache{BootID: boot, IterFunc: ki.iterFunc, Start: ki.vmStart, End: ki.vmEnd, FlagsOff: ki.vmFlags,
		Names: map[uint8]string{}, Gate: gate}
	for b := range 64 {
		if n.known&(1<<b) != 0 {
			c.Names[uint8(b)] = n.name[b]
		}
	}
	return c
}

func (c *cache) kernelInfo() kernelInfo {
	return kernelInfo{iterFunc: c.IterFunc, vmStart: c.Start, vmEnd: c.End, vmFlags: c.FlagsOff}
}

func (c *cache) names() names {
	var n names
	for b, name := range c.Names {
		n.name[b], n.known = name, n.known|1<<b
	}
	return n
}

// readCache reads the cache at path if it is this boot's and sound.
func readCache(path, boot string) (*cache, error) {
	if boot == "" {
		return nil, errors.New("no boot id")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c cache
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, err
	}
	if c.BootID != boot {
		return nil, errors.New("another boot's")
	}
	if c.IterFunc == 0 || c.End != c.Start+8 || len(c.Names) == 0 {
		return nil, errors.New("incomplete")
	}
	for b, name := range c.Names {
		if b >= 64 || name == "" || len(name) > 4 || strings.ContainsAny(name, " \n") {
			return nil, errors.New("bad name")
		}
	}
	return &c, nil
}

// writeCache writes c to path atomically, readable by root alone.
func writeCache(path string, c *cache) error {
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".vmflags-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
