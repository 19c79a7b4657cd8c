// Package deploy holds the deployment material of ferry agent; its test
// checks the systemd unit, the Kubernetes manifests and the certificate
// bootstrap with the tools at hand (this machine runs neither systemd as
// init nor Kubernetes).
package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrycr/ferry/internal/testutil"
)

func TestSystemdUnit(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("no systemd-analyze")
	}
	ferry := testutil.BuildCmd(t, "ferry")
	b, err := os.ReadFile("systemd/ferry-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	// The unit names the installed binary; verify it against the built one.
	unit := filepath.Join(t.TempDir(), "ferry-agent.service")
	if err := os.WriteFile(unit, []byte(strings.ReplaceAll(string(b), "/usr/local/bin/ferry", ferry)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, want := range []string{"Type=notify", "KillMode=process", "ferry agent"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the unit lacks %q", want)
		}
	}
}

func TestKubernetesManifests(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("no kubectl")
	}
	out, err := exec.Command("kubectl", "kustomize", "kubernetes").CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl kustomize: %v\n%s", err, out)
	}
	for _, want := range []string{"kind: Namespace", "kind: ServiceAccount", "kind: ClusterRole", "kind: DaemonSet",
		"hostPID: true", "privileged: true", "ferry-agent-certs"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the manifests lack %q", want)
		}
	}
}

func TestCertificateBootstrap(t *testing.T) {
	ferry := testutil.BuildCmd(t, "ferry")
	dir := filepath.Join(t.TempDir(), "pki")
	cmd := exec.Command("bash", "certs/bootstrap.sh", "--dir", dir, "node-a=10.0.0.1", "node-b=10.0.0.2,node-b.example")
	cmd.Env = append(os.Environ(), "FERRY="+ferry)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("bootstrap.sh: %v\n%s", err, out)
	}
	for _, f := range []string{"ca.crt", "gossip.key", "node-a.crt", "node-a.key", "node-b.crt", "node-b.key", "operator.crt", "operator.key"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("bootstrap.sh did not make %s", f)
		}
	}
	if err := exec.Command("bash", "certs/bootstrap.sh", "--no-such-option").Run(); err == nil {
		t.Error("bootstrap.sh accepted a bad option")
	}
}
