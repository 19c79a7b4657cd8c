package pki

import (
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestIssueVerifyRevokeLoad(t *testing.T) {
	dir := t.TempDir()
	ca, err := NewCA("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath, err := ca.Issue(dir, "node", 7, time.Hour, "127.0.0.1", "node.example")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(certPath)
	blk, _ := pem.Decode(b)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	for _, host := range []string{"127.0.0.1", "node.example"} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: host, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatalf("%s: %v", host, err)
		}
	}
	if st, _ := os.Stat(keyPath); st.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", st.Mode())
	}
	crl := filepath.Join(dir, "crl.pem")
	if err := ca.CRL(crl, 7); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(crl)
	blk, _ = pem.Decode(b)
	rl, err := x509.ParseRevocationList(blk.Bytes)
	if err != nil || len(rl.RevokedCertificateEntries) != 1 || rl.RevokedCertificateEntries[0].SerialNumber.Cmp(big.NewInt(7)) != 0 {
		t.Fatalf("CRL: %v %v", rl, err)
	}
	if err := rl.CheckSignatureFrom(ca.Cert); err != nil {
		t.Fatal(err)
	}
	ca.WriteCert(filepath.Join(dir, "ca.crt"))
	ca.WriteKey(filepath.Join(dir, "ca.key"))
	back, err := LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil || !back.Cert.Equal(ca.Cert) {
		t.Fatalf("LoadCA: %v", err)
	}
	if _, _, err := back.Issue(dir, "second", 8, time.Hour); err != nil {
		t.Fatalf("issuing with a loaded CA: %v", err)
	}
}
