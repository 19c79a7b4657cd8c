package images

import (
	"strings"

	"github.com/ferrycr/ferry/images/pb"
)

// OnOwnMount tells whether path lies on a mount of the tree's own mount
// namespace, or under a mount point it detached: the restore makes those,
// so nothing there can be checked or made from ferry's mount namespace.
func OnOwnMount(n *pb.MntNs, path string) bool {
	if n == nil {
		return false
	}
	if n.GetRoot() != "" {
		return true // a root of its own: every mount is the tree's
	}
	under := func(p string) bool { return path == p || strings.HasPrefix(path, strings.TrimSuffix(p, "/")+"/") }
	for _, m := range n.GetMounts() {
		if under(m.Point) {
			return true
		}
	}
	for _, p := range n.GetUnmounted() {
		if under(p) {
			return true
		}
	}
	return false
}
