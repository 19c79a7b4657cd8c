package restorecore

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/netrule"
	"github.com/ferrycr/ferry/internal/proc"
)

// VethPeer is where the outer end of a veth of the tree's network
// namespace goes (criu's --external veth[IN]:OUT@BRIDGE): a link named
// Out in ferry's network namespace, enslaved to Bridge if not empty.
type VethPeer struct {
	Out, Bridge string
}

// checkNetNs refuses, before anything is made, a veth whose outer end
// the options do not place.
func (r *restorer) checkNetNs() error {
	if n := r.is.inv.NetNs; n != nil {
		for _, l := range n.Links {
			if _, ok := r.opts.Veths[l.Name]; l.Kind == "veth" && !ok {
				return fmt.Errorf("%w: veth %s of the network namespace: name its end here with --external veth[%s]:NAME[@BRIDGE]", ErrValidation, l.Name, l.Name)
			}
			if _, ok := r.opts.Macvlans[l.Name]; l.Kind == "macvlan" && !ok {
				return fmt.Errorf("%w: macvlan %s of the network namespace: name its parent here with --external macvlan[%s]:LINK", ErrValidation, l.Name, l.Name)
			}
		}
	}
	return nil
}

// makeNetNs sets up the new network namespace of the root (pid here) as
// the images describe the tree's: its links (loopback, veth, macvlan,
// tun, bridge, vxlan) with their ports, MTU and hardware address, its
// sysctls, the links' addresses and state, the routes and rules, and its
// nftables and iptables rules. A veth is made from ferry's namespace, its
// inner end moved in, its outer end named and enslaved as Options.Veths
// says. Everything goes with the namespace if the restore fails.
func (r *restorer) makeNetNs(pid int) error {
	n := r.is.inv.NetNs
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	// Every link first (a VXLAN after the link it sends through), then
	// the bridges' ports, then each link's settings.
	links := slices.Clone(n.Links)
	late := func(l *pb.NetLink) int {
		if l.Kind == "vxlan" {
			return 1
		}
		return 0
	}
	slices.SortStableFunc(links, func(a, b *pb.NetLink) int { return cmp.Compare(late(a), late(b)) })
	for _, l := range links {
		if err := r.makeLink(h, ns, pid, l); err != nil {
			return err
		}
	}
	for _, l := range n.Links {
		if l.Master == "" {
			continue
		}
		link, err := h.LinkByName(l.Name)
		if err != nil {
			return fmt.Errorf("link %s: %w", l.Name, err)
		}
		br, err := h.LinkByName(l.Master)
		if err != nil {
			return fmt.Errorf("link %s: bridge %s: %w", l.Name, l.Master, err)
		}
		if err := h.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("link %s into bridge %s: %w", l.Name, l.Master, err)
		}
	}
	for _, l := range n.Links {
		link, err := h.LinkByName(l.Name)
		if err != nil {
			return fmt.Errorf("link %s: %w", l.Name, err)
		}
		if l.Mtu != 0 && int(l.Mtu) != link.Attrs().MTU {
			if err := h.LinkSetMTU(link, int(l.Mtu)); err != nil {
				return fmt.Errorf("link %s: MTU %d: %w", l.Name, l.Mtu, err)
			}
		}
		if l.Kind != "loopback" && len(l.HwAddr) > 0 {
			if err := h.LinkSetHardwareAddr(link, net.HardwareAddr(l.HwAddr)); err != nil {
				return fmt.Errorf("link %s: address %v: %w", l.Name, net.HardwareAddr(l.HwAddr), err)
			}
		}
	}
	// The sysctls before any link is up or has addresses: a link whose
	// IPv6 was off does not solicit routers or join groups in between.
	set, err := r.setNetSysctls(pid)
	if err != nil {
		return err
	}
	for _, l := range n.Links {
		link, err := h.LinkByName(l.Name)
		if err != nil {
			return fmt.Errorf("link %s: %w", l.Name, err)
		}
		for _, s := range l.Addrs {
			a, err := netlink.ParseAddr(s)
			if err != nil {
				return fmt.Errorf("link %s: address %q: %w", l.Name, s, err)
			}
			if a.IP.To4() == nil {
				a.Flags |= unix.IFA_F_NODAD // usable at once, as it was
			}
			if err := h.AddrAdd(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("link %s: address %s: %w", l.Name, s, err)
			}
		}
		if l.Up {
			if err := h.LinkSetUp(link); err != nil {
				return fmt.Errorf("link %s: up: %w", l.Name, err)
			}
		}
	}
	for _, rt := range n.Routes {
		nr := &netlink.Route{Family: int(rt.Family), Scope: netlink.Scope(rt.Scope), Protocol: netlink.RouteProtocol(rt.Protocol),
			Priority: int(rt.Priority), Table: int(rt.Table), Type: int(rt.Type)}
		if nr.Table == 0 {
			nr.Table = unix.RT_TABLE_MAIN
		}
		if nr.Type == 0 {
			nr.Type = unix.RTN_UNICAST
		}
		if rt.Dev != "" {
			link, err := h.LinkByName(rt.Dev)
			if err != nil {
				return fmt.Errorf("route %s: link %s: %w", rt.Dst, rt.Dev, err)
			}
			nr.LinkIndex = link.Attrs().Index
		}
		if rt.Dst != "" {
			if _, nr.Dst, err = net.ParseCIDR(rt.Dst); err != nil {
				return fmt.Errorf("route %q: %w", rt.Dst, err)
			}
		}
		nr.Gw, nr.Src, nr.Tos = net.ParseIP(rt.Gw), net.ParseIP(rt.Src), int(rt.Tos)
		for _, hop := range rt.Nexthops {
			nh := &netlink.NexthopInfo{Gw: net.ParseIP(hop.Gw), Hops: int(hop.Hops)}
			if hop.Onlink {
				nh.Flags = unix.RTNH_F_ONLINK
			}
			if hop.Dev != "" {
				link, err := h.LinkByName(hop.Dev)
				if err != nil {
					return fmt.Errorf("route %s: next hop's link %s: %w", rt.Dst, hop.Dev, err)
				}
				nh.LinkIndex = link.Attrs().Index
			}
			nr.MultiPath = append(nr.MultiPath, nh)
		}
		if rt.Onlink {
			nr.Flags = unix.RTNH_F_ONLINK
		}
		if m := rt.Metrics; m != nil {
			nr.MTU, nr.MTULock, nr.Window, nr.Rtt, nr.RttVar = int(m.Mtu), m.MtuLock, int(m.Window), int(m.Rtt), int(m.Rttvar)
			nr.Ssthresh, nr.Cwnd, nr.AdvMSS, nr.Reordering, nr.Hoplimit = int(m.Ssthresh), int(m.Cwnd), int(m.Advmss), int(m.Reordering), int(m.Hoplimit)
			nr.InitCwnd, nr.Features, nr.RtoMin, nr.RtoMinLock, nr.InitRwnd = int(m.Initcwnd), int(m.Features), int(m.RtoMin), m.RtoMinLock, int(m.Initrwnd)
			nr.QuickACK, nr.Congctl, nr.FastOpenNoCookie = int(m.Quickack), m.Congctl, int(m.FastopenNoCookie)
		}
		if err := h.RouteAdd(nr); err != nil && !errors.Is(err, unix.EEXIST) {
			dst := rt.Dst
			if dst == "" {
				dst = "default"
			}
			return fmt.Errorf("route %s via %q dev %s (table %d): %w", dst, rt.Gw, rt.Dev, nr.Table, err)
		}
	}
	if len(n.Rules) > 0 {
		if err := setRules(h, n.Rules); err != nil {
			return err
		}
	}
	if n.NftRuleset != "" {
		if err := loadNftables(pid, n.NftRuleset); err != nil {
			return err
		}
	}
	for _, tool := range slices.Sorted(maps.Keys(n.Iptables)) {
		if err := restoreIptables(pid, tool, n.Iptables[tool]); err != nil {
			return err
		}
	}
	r.log.Info("network namespace made", "links", len(n.Links), "routes", len(n.Routes), "sysctls set", set)
	return nil
}

// makeLink makes link l of the tree's network namespace ns (of process
// pid; h is a netlink handle in it), bare: its settings, addresses and
// state come after.
func (r *restorer) makeLink(h *netlink.Handle, ns netns.NsHandle, pid int, l *pb.NetLink) error {
	switch l.Kind {
	case "loopback":
	case "veth":
		peer := r.opts.Veths[l.Name] // checkNetNs
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: peer.Out}, PeerName: l.Name, PeerNamespace: netlink.NsFd(int(ns))}
		if err := netlink.LinkAdd(v); err != nil {
			return fmt.Errorf("veth %s (%s here): %w", l.Name, peer.Out, err)
		}
		out, err := netlink.LinkByName(peer.Out)
		if err != nil {
			return err
		}
		if peer.Bridge != "" {
			br, err := netlink.LinkByName(peer.Bridge)
			if err != nil {
				return fmt.Errorf("bridge %s for veth %s: %w", peer.Bridge, peer.Out, err)
			}
			if err := netlink.LinkSetMaster(out, br); err != nil {
				return fmt.Errorf("veth %s into bridge %s: %w", peer.Out, peer.Bridge, err)
			}
		}
		return netlink.LinkSetUp(out)
	case "macvlan":
		// Made on its parent here, straight into the namespace.
		parent, err := netlink.LinkByName(r.opts.Macvlans[l.Name])
		if err != nil {
			return fmt.Errorf("macvlan %s: parent %s: %w", l.Name, r.opts.Macvlans[l.Name], err)
		}
		mv := &netlink.Macvlan{LinkAttrs: netlink.LinkAttrs{Name: l.Name, ParentIndex: parent.Attrs().Index, Namespace: netlink.NsFd(int(ns))},
			Mode: netlink.MacvlanMode(l.MacvlanMode)}
		if err := netlink.LinkAdd(mv); err != nil {
			return fmt.Errorf("macvlan %s on %s: %w", l.Name, r.opts.Macvlans[l.Name], err)
		}
	case "tun":
		if err := makeTun(pid, l); err != nil {
			return fmt.Errorf("%s %s: %w", l.Kind, l.Name, err)
		}
		if !l.TunPersist {
			r.tunTransient = append(r.tunTransient, l.Name)
			r.tunNs = pid
		}
	case "bridge":
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: l.Name}}
		// The timers always; the rest only where not the default: a
		// kernel without VLAN filtering or multicast snooping refuses
		// the attribute even to turn the feature off.
		if b := l.Bridge; b != nil {
			br.AgeingTime, br.HelloTime = &b.AgeingTime, &b.HelloTime
			if !b.MulticastSnooping {
				br.MulticastSnooping = &b.MulticastSnooping
			}
			if b.VlanFiltering {
				br.VlanFiltering = &b.VlanFiltering
				if pvid := uint16(b.VlanDefaultPvid); pvid != 0 {
					br.VlanDefaultPVID = &pvid
				}
			}
			if mask := uint16(b.GroupFwdMask); mask != 0 {
				br.GroupFwdMask = &mask
			}
		}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("bridge %s: %w", l.Name, err)
		}
	case "vxlan":
		v := l.Vxlan
		if v == nil {
			return fmt.Errorf("%w: vxlan %s without its settings", ErrValidation, l.Name)
		}
		vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: l.Name}, VxlanId: int(v.Id), Group: net.ParseIP(v.Group), SrcAddr: net.ParseIP(v.Local),
			Port: int(v.Port), PortLow: int(v.PortLow), PortHigh: int(v.PortHigh), TTL: int(v.Ttl), TOS: int(v.Tos),
			Learning: v.Learning, Proxy: v.Proxy, RSC: v.Rsc, L2miss: v.L2Miss, L3miss: v.L3Miss, UDPCSum: v.UdpCsum,
			UDP6ZeroCSumTx: v.Udp6ZeroCsumTx, UDP6ZeroCSumRx: v.Udp6ZeroCsumRx, NoAge: v.NoAge, Age: int(v.Age), Limit: int(v.Limit),
			GBP: v.Gbp, FlowBased: v.FlowBased}
		if v.Dev != "" {
			dev, err := h.LinkByName(v.Dev)
			if err != nil {
				return fmt.Errorf("vxlan %s: device %s: %w", l.Name, v.Dev, err)
			}
			vx.VtepDevIndex = dev.Attrs().Index
		}
		if err := h.LinkAdd(vx); err != nil {
			return fmt.Errorf("vxlan %s: %w", l.Name, err)
		}
	default:
		return fmt.Errorf("%w: link %s of kind %q", ErrValidation, l.Name, l.Kind)
	}
	return nil
}

// setRules makes the new namespace's policy routing rules the images':
// the kernel's defaults, which it has already, go if the images lack
// them; the others are added.
func setRules(h *netlink.Handle, want []*pb.NetRule) error {
	have, err := h.RuleList(netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("routing rules: %w", err)
	}
	wanted := map[string]bool{}
	for _, r := range want {
		wanted[netrule.Key(r)] = true
	}
	present := map[string]bool{}
	for _, r := range have {
		k := netrule.Key(netrule.Save(r))
		present[k] = true
		if !wanted[k] {
			if err := h.RuleDel(&r); err != nil {
				return fmt.Errorf("routing rule %d (table %d): remove: %w", r.Priority, r.Table, err)
			}
		}
	}
	for _, nr := range want {
		if present[netrule.Key(nr)] {
			continue
		}
		r, err := netrule.Make(nr)
		if err != nil {
			return err
		}
		if err := h.RuleAdd(r); err != nil {
			return fmt.Errorf("routing rule %d (table %d): %w", nr.Priority, nr.Table, err)
		}
	}
	return nil
}

// setNetSysctls gives the new namespace's sysctls the images' values
// where they differ, once its links exist (before they are up): the
// namespace-wide ones first, then the defaults and "all" of each family
// (which would change every link's), then each link's own. A sysctl this kernel lacks or
// refuses fails the restore, naming it, unless --weak-sysctls (then it is
// logged and left).
func (r *restorer) setNetSysctls(pid int) (int, error) {
	scs := slices.Clone(r.is.inv.NetNs.Sysctls)
	rank := func(name string) int {
		parts := strings.Split(name, "/")
		if len(parts) < 5 || parts[2] != "conf" && parts[2] != "neigh" {
			return 0 // net/ipv4/ip_forward, net/core/somaxconn, ...
		}
		switch parts[3] {
		case "all":
			return 1
		case "default":
			return 2
		}
		return 3 // net/ipv4/conf/eth0/...
	}
	slices.SortStableFunc(scs, func(a, b *pb.Sysctl) int { return rank(a.Name) - rank(b.Name) })
	set := 0
	err := proc.InNamespace(pid, "net", func() error {
		for _, sc := range scs {
			p := "/proc/sys/" + sc.Name
			if b, err := os.ReadFile(p); err == nil && strings.TrimSuffix(string(b), "\n") == sc.Value {
				continue
			}
			err := os.WriteFile(p, []byte(sc.Value), 0)
			if err == nil {
				set++
				continue
			}
			if !r.opts.WeakSysctls {
				return fmt.Errorf("sysctl %s = %q: %w (--weak-sysctls restores without it)", sc.Name, sc.Value, err)
			}
			r.log.Warn("sysctl left as it is (--weak-sysctls)", "name", sc.Name, "value", sc.Value, "err", err)
		}
		return nil
	})
	return set, err
}

// loadNftables loads the tree's nftables tables into its new namespace
// (nft -f, run from a thread in it).
func loadNftables(pid int, ruleset string) error {
	nft, err := exec.LookPath("nft")
	if err != nil {
		return fmt.Errorf("the images hold nftables tables: loading them needs nft (Debian's nftables): %w", err)
	}
	return proc.InNamespace(pid, "net", func() error {
		cmd := exec.Command(nft, "-f", "-")
		cmd.Stdin = strings.NewReader(ruleset)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nft -f (the images' nftables tables): %w: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	})
}

// tun ioctls (include/uapi/linux/if_tun.h).
const (
	tunsetiff     = 0x400454ca
	tunsetpersist = 0x400454cb
	tunsetowner   = 0x400454cc
	tunsetgroup   = 0x400454ce
)

// makeTun makes tun or tap device l in pid's network namespace,
// persistent for now (the processes attach to it as they take their
// /dev/net/tun descriptors; endTransientTuns ends that), with its owner
// and group.
func makeTun(pid int, l *pb.NetLink) error {
	return proc.InNamespace(pid, "net", func() error {
		fd, err := attachTun(l.Name, l.TunFlags)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		for _, o := range []struct {
			req uint
			v   int64
		}{{tunsetowner, l.TunOwner}, {tunsetgroup, l.TunGroup}, {tunsetpersist, 1}} {
			if o.v >= 0 {
				if err := unix.IoctlSetInt(fd, o.req, int(o.v)); err != nil {
					return fmt.Errorf("ioctl %#x: %w", o.req, err)
				}
			}
		}
		return nil
	})
}

// endTransientTuns makes the tun devices that were not persistent so
// again, through a descriptor a process of the tree holds on each (they
// go with their last descriptor, as before).
func (r *restorer) endTransientTuns() error {
	for _, name := range r.tunTransient {
		at, ok := r.tunFds[name]
		if !ok {
			// Held by no process of the tree: it goes now.
			var flags uint32
			for _, l := range r.is.inv.GetNetNs().GetLinks() {
				if l.Name == name {
					flags = l.TunFlags
				}
			}
			if err := dropTun(r.tunNs, name, flags); err != nil {
				return err
			}
			continue
		}
		pidfd, err := unix.PidfdOpen(at[0], 0)
		if err != nil {
			return os.NewSyscallError("pidfd_open", err)
		}
		fd, err := unix.PidfdGetfd(pidfd, at[1], 0)
		unix.Close(pidfd)
		if err != nil {
			return os.NewSyscallError("pidfd_getfd", err)
		}
		err = unix.IoctlSetInt(fd, tunsetpersist, 0)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("tun %s: TUNSETPERSIST 0: %w", name, err)
		}
	}
	return nil
}

// restoreIptables loads saved iptables rules into the tree's new network
// namespace with tool's -restore (iptables-nft-restore, ...).
func restoreIptables(pid int, tool, rules string) error {
	if !slices.Contains([]string{"iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy"}, tool) {
		return fmt.Errorf("%w: iptables rules saved by %q, which ferry does not run", ErrValidation, tool)
	}
	path, err := exec.LookPath(tool + "-restore")
	if err != nil {
		return fmt.Errorf("the images hold %s rules: loading them needs %s-restore (Debian's iptables): %w", tool, tool, err)
	}
	return proc.InNamespace(pid, "net", func() error {
		cmd := exec.Command(path)
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s-restore: %w: %s", tool, err, strings.TrimSpace(string(out)))
		}
		return nil
	})
}

// dropTun removes persistent tun device name of pid's network namespace
// (attached, made transient, let go).
func dropTun(pid int, name string, flags uint32) error {
	return proc.InNamespace(pid, "net", func() error {
		fd, err := attachTun(name, flags)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.IoctlSetInt(fd, tunsetpersist, 0)
	})
}

// attachTun opens /dev/net/tun attached to tun device name of the calling
// thread's network namespace (made if missing), with TUNSETIFF flags.
func attachTun(name string, flags uint32) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("open /dev/net/tun", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(uint16(flags))
		err = unix.IoctlIfreq(fd, tunsetiff, ifr)
	}
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("tun %s: TUNSETIFF: %w", name, err)
	}
	return fd, nil
}
