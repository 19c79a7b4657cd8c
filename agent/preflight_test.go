package agent

import (
	"os"
	"strings"
	"testing"

	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
)

func TestPreflightRefusals(t *testing.T) {
	// Each refusal names its reason, before anything is touched.
	a := &Agent{cfg: Config{Name: "host-b"}}
	if vdso() == "" {
		t.Skip("cannot read this kernel's vDSO")
	}
	if err := a.preflight(&agentv1.PrepareRequest{Vdso: vdso(), CpuFlags: cpuFlags()}); err != nil {
		t.Fatalf("a request this node can take: %v", err)
	}
	for _, c := range []struct {
		req  *agentv1.PrepareRequest
		want string
	}{
		{&agentv1.PrepareRequest{Vdso: "[vvar]:16384 [vdso]:8192 sha256:0011223344556677"}, "another vDSO"},
		{&agentv1.PrepareRequest{CpuFlags: []string{"avx512_imaginary"}}, "avx512_imaginary"},
		{&agentv1.PrepareRequest{Pids: []int32{int32(os.Getpid())}}, "is taken on host-b"},
		{&agentv1.PrepareRequest{Rss: 1 << 62}, "memory"},
	} {
		err := a.preflight(c.req)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("preflight(%v) = %v; want a refusal naming %q", c.req, err, c.want)
		}
	}
}
