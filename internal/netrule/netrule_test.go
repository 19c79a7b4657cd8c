package netrule

import (
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
)

// TestRoundTrip: a rule with every selector comes back from its image
// form the same, and two rules that differ in one selector have
// different keys.
func TestRoundTrip(t *testing.T) {
	r := netlink.NewRule()
	r.Family, r.Priority, r.Table, r.Type = unix.AF_INET, 200, 101, unix.FR_ACT_TO_TBL
	mask := uint32(0xff)
	r.Mark, r.Mask, r.Tos, r.IifName, r.OifName = 0x10, &mask, 8, "eth0", "lo"
	_, r.Src, _ = net.ParseCIDR("10.99.0.0/24")
	_, r.Dst, _ = net.ParseCIDR("10.50.0.0/16")
	r.IPProto, r.Dport, r.Sport = unix.IPPROTO_TCP, netlink.NewRulePortRange(80, 90), netlink.NewRulePortRange(1000, 2000)
	r.UIDRange, r.Invert, r.SuppressPrefixlen, r.Protocol = netlink.NewRuleUIDRange(1000, 1999), true, 8, 4
	saved := Save(*r)
	back, err := Make(saved)
	if err != nil {
		t.Fatal(err)
	}
	if got := Save(*back); Key(got) != Key(saved) {
		t.Fatalf("round trip:\n got  %v\n want %v", got, saved)
	}
	if back.Src.String() != "10.99.0.0/24" || *back.Mask != 0xff || back.Dport.End != 90 || back.UIDRange.Start != 1000 || back.Goto != -1 {
		t.Fatalf("made %+v", back)
	}
	other := *r
	other.Priority = 201
	if Key(Save(other)) == Key(saved) {
		t.Fatal("rules of different priorities share a key")
	}
	if _, err := Make(&pb.NetRule{Priority: 5, Src: "10.1.2.3/99"}); err == nil {
		t.Fatal("a bad address was taken")
	}
}
