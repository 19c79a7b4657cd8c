// Package netrule converts policy routing rules (ip rule) between
// netlink's form and the images'.
package netrule

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
)

// Save returns rule r as the images keep it.
func Save(r netlink.Rule) *pb.NetRule {
	nr := &pb.NetRule{Family: int32(r.Family), Priority: int32(r.Priority), Table: uint32(r.Table), Action: uint32(r.Type),
		Mark: r.Mark, Tos: uint32(r.Tos), TunId: uint64(r.TunID), Goto: int32(r.Goto), Flow: int32(r.Flow),
		Iif: r.IifName, Oif: r.OifName, SuppressIfgroup: int32(r.SuppressIfgroup), SuppressPrefixlen: int32(r.SuppressPrefixlen),
		Invert: r.Invert, IpProto: uint32(r.IPProto), Protocol: uint32(r.Protocol)}
	if r.Mask != nil {
		nr.HasMask, nr.Mask = true, *r.Mask
	}
	if r.Src != nil {
		nr.Src = r.Src.String()
	}
	if r.Dst != nil {
		nr.Dst = r.Dst.String()
	}
	if p := r.Sport; p != nil {
		nr.SportStart, nr.SportEnd = uint32(p.Start), uint32(p.End)
	}
	if p := r.Dport; p != nil {
		nr.DportStart, nr.DportEnd = uint32(p.Start), uint32(p.End)
	}
	if u := r.UIDRange; u != nil {
		nr.HasUidRange, nr.UidStart, nr.UidEnd = true, u.Start, u.End
	}
	return nr
}

// Make returns the netlink rule that adds nr.
func Make(nr *pb.NetRule) (*netlink.Rule, error) {
	r := netlink.NewRule()
	r.Family, r.Priority, r.Table, r.Type = int(nr.Family), int(nr.Priority), int(nr.Table), uint8(nr.Action)
	r.Mark, r.Tos, r.TunID, r.Goto, r.Flow = nr.Mark, uint(nr.Tos), uint(nr.TunId), int(nr.Goto), int(nr.Flow)
	r.IifName, r.OifName, r.SuppressIfgroup, r.SuppressPrefixlen = nr.Iif, nr.Oif, int(nr.SuppressIfgroup), int(nr.SuppressPrefixlen)
	r.Invert, r.IPProto, r.Protocol = nr.Invert, int(nr.IpProto), uint8(nr.Protocol)
	if nr.HasMask {
		m := nr.Mask
		r.Mask = &m
	}
	for _, c := range []struct {
		s   string
		dst **net.IPNet
	}{{nr.Src, &r.Src}, {nr.Dst, &r.Dst}} {
		if c.s == "" {
			continue
		}
		_, n, err := net.ParseCIDR(c.s)
		if err != nil {
			return nil, fmt.Errorf("rule %d: address %q: %w", nr.Priority, c.s, err)
		}
		*c.dst = n
	}
	if nr.SportStart != 0 || nr.SportEnd != 0 {
		r.Sport = netlink.NewRulePortRange(uint16(nr.SportStart), uint16(nr.SportEnd))
	}
	if nr.DportStart != 0 || nr.DportEnd != 0 {
		r.Dport = netlink.NewRulePortRange(uint16(nr.DportStart), uint16(nr.DportEnd))
	}
	if nr.HasUidRange {
		r.UIDRange = netlink.NewRuleUIDRange(nr.UidStart, nr.UidEnd)
	}
	return r, nil
}

// Key identifies a rule: two rules with the same key are the same rule.
func Key(nr *pb.NetRule) string {
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(nr)
	return string(b)
}
