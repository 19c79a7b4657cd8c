package dumpcore

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/netrule"
	"github.com/ferrycr/ferry/internal/proc"
)

// netNamespace describes the tree's network namespace, if it has one of
// its own: its links (loopback and veth ends; any other kind is refused
// by name), their addresses, and the routes of the main table the kernel
// did not derive from an address, its sysctls (those that can be read
// and written) and its nftables tables (but ferry's own network lock; as
// nft prints them). A namespace where iptables (x_tables) is in use is
// refused: its rules are not saved yet.
func (t *tree) netNamespace() (*pb.NetNs, error) {
	if t.ownNs["net"] == "" {
		return nil, nil
	}
	if t.opts.EmptyNet {
		return &pb.NetNs{}, nil // made new, set up by the caller
	}
	ns, err := netns.GetFromPid(t.root)
	if err != nil {
		return nil, fmt.Errorf("network namespace of %d: %w", t.root, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("network namespace of %d: %w", t.root, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("network namespace of %d: links: %w", t.root, err)
	}
	out := &pb.NetNs{}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	// inNs names the link of the namespace at index (what a port's
	// bridge or a VXLAN's device is), refusing one outside it.
	inNs := func(l netlink.Link, what string, index int) (string, error) {
		if index == 0 {
			return "", nil
		}
		if name, ok := names[index]; ok {
			return name, nil
		}
		return "", fmt.Errorf("link %s of the network namespace of %d: its %s (link %d) is outside the namespace: %w", l.Attrs().Name, t.root, what, index, ErrUnsupported)
	}
	for _, l := range links {
		a := l.Attrs()
		nl := &pb.NetLink{Name: a.Name, Mtu: uint32(a.MTU), HwAddr: a.HardwareAddr, Up: a.Flags&net.FlagUp != 0}
		if nl.Master, err = inNs(l, "bridge", a.MasterIndex); err != nil {
			return nil, err
		}
		switch {
		case a.Flags&net.FlagLoopback != 0:
			nl.Kind = "loopback"
		case l.Type() == "veth":
			nl.Kind = "veth"
		case l.Type() == "macvlan":
			nl.Kind, nl.MacvlanMode = "macvlan", uint32(l.(*netlink.Macvlan).Mode)
		case l.Type() == "tuntap":
			tt := l.(*netlink.Tuntap)
			nl.Kind, nl.TunFlags, nl.TunPersist = "tun", uint32(tt.Mode)|uint32(tt.Flags), !tt.NonPersist
			// 0 is also what netlink leaves when the device has none:
			// read as none (root may attach whatever the owner).
			nl.TunOwner, nl.TunGroup = int64(int32(tt.Owner)), int64(int32(tt.Group))
			if tt.Owner == 0 {
				nl.TunOwner = -1
			}
			if tt.Group == 0 {
				nl.TunGroup = -1
			}
		case l.Type() == "bridge":
			nl.Kind, nl.Bridge = "bridge", saveBridge(l.(*netlink.Bridge))
		case l.Type() == "vxlan":
			vx := l.(*netlink.Vxlan)
			nl.Kind, nl.Vxlan = "vxlan", saveVxlan(vx)
			if nl.Vxlan.Dev, err = inNs(l, "device", vx.VtepDevIndex); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("link %s (%s) in the network namespace of %d, which ferry does not save yet: %w", a.Name, l.Type(), t.root, ErrUnsupported)
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if ad.IP.IsLinkLocalUnicast() && ad.IP.To4() == nil {
				continue // made by the kernel when the link goes up
			}
			nl.Addrs = append(nl.Addrs, ad.IPNet.String())
		}
		out.Links = append(out.Links, nl)
	}
	rules, err := h.RuleList(netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("routing rules: %w", err)
	}
	for _, r := range rules {
		out.Rules = append(out.Rules, netrule.Save(r))
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("routes: %w", err)
	}
	for _, r := range routes {
		if r.Table == unix.RT_TABLE_LOCAL || r.Protocol == unix.RTPROT_KERNEL ||
			(r.Dst != nil && r.Dst.IP.IsLinkLocalUnicast()) || r.Type == unix.RTN_MULTICAST {
			continue // derived from an address, or the kernel's own
		}
		if !savedRouteType[r.Type] {
			return nil, fmt.Errorf("route to %v (table %d, type %d) in the network namespace of %d, which ferry does not save yet: %w",
				r.Dst, r.Table, r.Type, t.root, ErrUnsupported)
		}
		nr := &pb.NetRoute{Family: int32(r.Family), Dev: names[r.LinkIndex], Scope: int32(r.Scope),
			Protocol: int32(r.Protocol), Priority: int32(r.Priority), Onlink: r.Flags&unix.RTNH_F_ONLINK != 0,
			Tos: int32(r.Tos), Metrics: saveRouteMetrics(r), Table: uint32(r.Table), Type: int32(r.Type)}
		if r.Table == unix.RT_TABLE_MAIN {
			nr.Table = 0
		}
		if r.Type == unix.RTN_UNICAST {
			nr.Type = 0
		}
		if r.Dst != nil {
			nr.Dst = r.Dst.String()
		}
		if r.Gw != nil {
			nr.Gw = r.Gw.String()
		}
		if r.Src != nil {
			nr.Src = r.Src.String()
		}
		for _, h := range r.MultiPath {
			if h.NewDst != nil || h.Encap != nil || h.Via != nil {
				return nil, fmt.Errorf("route to %v: a next hop with MPLS or a gateway of another family, which ferry does not save yet: %w", r.Dst, ErrUnsupported)
			}
			nh := &pb.NetNexthop{Dev: names[h.LinkIndex], Hops: uint32(h.Hops), Onlink: h.Flags&unix.RTNH_F_ONLINK != 0}
			if h.Gw != nil {
				nh.Gw = h.Gw.String()
			}
			nr.Nexthops = append(nr.Nexthops, nh)
		}
		out.Routes = append(out.Routes, nr)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return nil, err
	}
	defer c.CloseLasting()
	tables, err := c.ListTables()
	if err != nil {
		return nil, fmt.Errorf("nftables of the network namespace of %d: %w", t.root, err)
	}
	var own []*nftables.Table
	for _, tb := range tables {
		if !strings.HasPrefix(tb.Name, "ferry-lock-") {
			own = append(own, tb)
		}
	}
	err = proc.InNamespace(t.root, "net", func() error {
		sysctls, err := proc.ReadSysctls("net")
		if err != nil {
			return fmt.Errorf("sysctls: %w", err)
		}
		for _, sc := range sysctls {
			out.Sysctls = append(out.Sysctls, &pb.Sysctl{Name: sc.Name, Value: sc.Value})
		}
		// iptables first: the tables iptables-nft manages are saved
		// with it (nft would print them, but iptables could not read
		// them back).
		managed, err := t.saveIptables(out)
		if err != nil {
			return err
		}
		own = slices.DeleteFunc(own, func(tb *nftables.Table) bool { return managed[nftFamily(tb.Family)+" "+tb.Name] })
		if len(own) == 0 {
			return nil
		}
		nft, err := exec.LookPath("nft")
		if err != nil {
			return fmt.Errorf("nftables table %s in the namespace: saving it needs nft (Debian's nftables): %w", own[0].Name, err)
		}
		var ruleset strings.Builder
		for _, tb := range own {
			// Run from this thread, in the namespace.
			b, err := exec.Command(nft, "list", "table", nftFamily(tb.Family), tb.Name).Output()
			if err != nil {
				return fmt.Errorf("nft list table %s %s: %w", nftFamily(tb.Family), tb.Name, err)
			}
			ruleset.Write(b)
		}
		out.NftRuleset = ruleset.String()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("network namespace of %d: %w", t.root, err)
	}
	return out, nil
}

// nftFamilies are nft's names of the table families.
var nftFamilies = map[nftables.TableFamily]string{
	nftables.TableFamilyIPv4: "ip", nftables.TableFamilyIPv6: "ip6", nftables.TableFamilyINet: "inet",
	nftables.TableFamilyARP: "arp", nftables.TableFamilyBridge: "bridge", nftables.TableFamilyNetdev: "netdev",
}

// nftFamily is nft's name for a table family.
func nftFamily(f nftables.TableFamily) string {
	if name, ok := nftFamilies[f]; ok {
		return name
	}
	return fmt.Sprint(int(f))
}

// saveIptables saves, from a thread in the tree's network namespace, its
// iptables rules: the tables of iptables-nft (whose names it returns, as
// "ip filter") and those of the legacy x_tables, with each family's
// -save tool. A family in use whose tool is missing is refused by name.
func (t *tree) saveIptables(out *pb.NetNs) (map[string]bool, error) {
	managed := map[string]bool{}
	for _, f := range []struct{ family, names string }{{"ip", "ip_tables_names"}, {"ip6", "ip6_tables_names"}} {
		tool := map[string]string{"ip": "iptables", "ip6": "ip6tables"}[f.family]
		for _, flavor := range []string{"nft", "legacy"} {
			if flavor == "legacy" {
				// Only when x_tables is in use in the namespace.
				b, err := os.ReadFile("/proc/thread-self/net/" + f.names)
				if err != nil || len(strings.TrimSpace(string(b))) == 0 {
					continue
				}
			}
			name := tool + "-" + flavor
			path, err := exec.LookPath(name + "-save")
			if err != nil {
				if flavor == "legacy" {
					return nil, fmt.Errorf("%s (x_tables) in use in the namespace: saving it needs %s-save (Debian's iptables): %w", tool, name, ErrUnsupported)
				}
				continue // no iptables-nft here: its tables, if any, are nft's
			}
			b, err := exec.Command(path).Output()
			if err != nil {
				return nil, fmt.Errorf("%s-save: %w", name, err)
			}
			var tables []string
			for _, line := range strings.Split(string(b), "\n") {
				if table, ok := strings.CutPrefix(line, "*"); ok {
					tables = append(tables, table)
					managed[f.family+" "+table] = flavor == "nft"
				}
			}
			if len(tables) > 0 {
				if out.Iptables == nil {
					out.Iptables = map[string]string{}
				}
				out.Iptables[name] = string(b)
			}
		}
	}
	return managed, nil
}

// saveBridge returns a bridge's settings (netlink reports them all).
func saveBridge(b *netlink.Bridge) *pb.NetBridge {
	nb := &pb.NetBridge{}
	if b.MulticastSnooping != nil {
		nb.MulticastSnooping = *b.MulticastSnooping
	}
	if b.AgeingTime != nil {
		nb.AgeingTime = *b.AgeingTime
	}
	if b.HelloTime != nil {
		nb.HelloTime = *b.HelloTime
	}
	if b.VlanFiltering != nil {
		nb.VlanFiltering = *b.VlanFiltering
	}
	if b.VlanDefaultPVID != nil {
		nb.VlanDefaultPvid = uint32(*b.VlanDefaultPVID)
	}
	if b.GroupFwdMask != nil {
		nb.GroupFwdMask = uint32(*b.GroupFwdMask)
	}
	return nb
}

// saveVxlan returns a VXLAN link's settings but its device (a name the
// caller finds).
func saveVxlan(v *netlink.Vxlan) *pb.NetVxlan {
	nv := &pb.NetVxlan{Id: uint32(v.VxlanId), Port: uint32(v.Port), PortLow: uint32(v.PortLow), PortHigh: uint32(v.PortHigh),
		Ttl: uint32(v.TTL), Tos: uint32(v.TOS), Learning: v.Learning, Proxy: v.Proxy, Rsc: v.RSC, L2Miss: v.L2miss, L3Miss: v.L3miss,
		UdpCsum: v.UDPCSum, Udp6ZeroCsumTx: v.UDP6ZeroCSumTx, Udp6ZeroCsumRx: v.UDP6ZeroCSumRx, NoAge: v.NoAge,
		Age: uint32(v.Age), Limit: uint32(v.Limit), Gbp: v.GBP, FlowBased: v.FlowBased}
	if len(v.Group) > 0 && !v.Group.IsUnspecified() {
		nv.Group = v.Group.String()
	}
	if len(v.SrcAddr) > 0 && !v.SrcAddr.IsUnspecified() {
		nv.Local = v.SrcAddr.String()
	}
	return nv
}

// saveRouteMetrics returns a route's metrics, nil if it has none.
func saveRouteMetrics(r netlink.Route) *pb.NetRouteMetrics {
	m := &pb.NetRouteMetrics{Mtu: uint32(r.MTU), MtuLock: r.MTULock, Window: uint32(r.Window), Rtt: uint32(r.Rtt),
		Rttvar: uint32(r.RttVar), Ssthresh: uint32(r.Ssthresh), Cwnd: uint32(r.Cwnd), Advmss: uint32(r.AdvMSS),
		Reordering: uint32(r.Reordering), Hoplimit: uint32(r.Hoplimit), Initcwnd: uint32(r.InitCwnd),
		Features: uint32(r.Features), RtoMin: uint32(r.RtoMin), RtoMinLock: r.RtoMinLock, Initrwnd: uint32(r.InitRwnd),
		Quickack: uint32(r.QuickACK), Congctl: r.Congctl, FastopenNoCookie: uint32(r.FastOpenNoCookie)}
	if proto.Equal(m, &pb.NetRouteMetrics{}) {
		return nil
	}
	return m
}

// savedRouteType holds the kinds of routes saved: to a link or gateway,
// and those that drop or send back (policy routing's).
var savedRouteType = map[int]bool{unix.RTN_UNICAST: true, unix.RTN_BLACKHOLE: true, unix.RTN_UNREACHABLE: true,
	unix.RTN_PROHIBIT: true, unix.RTN_THROW: true}
