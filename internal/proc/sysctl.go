package proc

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Sysctl is a sysctl's path under /proc/sys and its value (without the
// final newline).
type Sysctl struct{ Name, Value string }

// ReadSysctls reads every sysctl under /proc/sys/DIR that can be read and
// written, as the calling thread's namespaces show them (/proc/sys/net is
// the thread's network namespace's).
func ReadSysctls(dir string) ([]Sysctl, error) {
	var out []Sysctl
	top := "/proc/sys"
	err := filepath.WalkDir(filepath.Join(top, dir), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil || info.Mode()&0o200 == 0 {
			return nil // gone, or read-only
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil // write-only (a flush), or unset (stable_secret)
		}
		out = append(out, Sysctl{Name: strings.TrimPrefix(p, top+"/"), Value: strings.TrimSuffix(string(b), "\n")})
		return nil
	})
	return out, err
}
