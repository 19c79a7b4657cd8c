package testutil

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/ferrycr/ferry/pki"
)

// CA is a throwaway certificate authority for TLS tests (see package pki).
type CA struct{ ca *pki.CA }

// NewCA creates a CA named name.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	ca, err := pki.NewCA(name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{ca}
}

// Issue writes a certificate and key for name into dir (valid for
// 127.0.0.1, for both server and client auth); it returns their paths.
func (c *CA) Issue(t testing.TB, dir, name string, serial int64) (string, string) {
	t.Helper()
	cert, key, err := c.ca.Issue(dir, name, serial, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// Write stores the CA certificate as dir/name and returns its path.
func (c *CA) Write(t testing.TB, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := c.ca.WriteCert(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// CRL writes a revocation list of serials signed by the CA.
func (c *CA) CRL(t testing.TB, dir string, serials ...int64) string {
	t.Helper()
	p := filepath.Join(dir, "crl.pem")
	if err := c.ca.CRL(p, serials...); err != nil {
		t.Fatal(err)
	}
	return p
}
