package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T, name string) *ca {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &ca{cert: c, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes a certificate and key for name (also valid for 127.0.0.1)
// and returns their paths.
func (c *ca) issue(t *testing.T, dir, name string, serial int64) (string, string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	cp, kp := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	os.WriteFile(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(kp, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return cp, kp
}

func (c *ca) write(t *testing.T, dir, name string) string {
	p := filepath.Join(dir, name)
	os.WriteFile(p, c.pem, 0o600)
	return p
}

func (c *ca) crl(t *testing.T, dir string, serials ...int64) string {
	var revoked []x509.RevocationListEntry
	for _, s := range serials {
		revoked = append(revoked, x509.RevocationListEntry{SerialNumber: big.NewInt(s), RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1),
		ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour), RevokedCertificateEntries: revoked}, c.cert, c.key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "crl.pem")
	os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o600)
	return p
}

// roundTrip runs one hello + frame exchange; it returns the client's and
// the server's errors.
func roundTrip(t *testing.T, srv, cli TLS, zstd bool) (error, error) {
	t.Helper()
	l, err := Listen("127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	serr := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			serr <- err
			return
		}
		defer c.Close()
		s, err := Server(c)
		if err != nil {
			serr <- err
			return
		}
		typ, p, err := s.ReadFrame(nil)
		if err == nil && (typ != 7 || string(p) != "pages") {
			err = errors.New("wrong frame")
		}
		if err == nil {
			err = s.WriteFrame(8, []byte("ack"))
			s.Flush()
		}
		serr <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, l.Addr().String(), cli)
	if err != nil {
		return err, <-serr
	}
	s, err := Client(c, zstd)
	if err != nil {
		return err, <-serr
	}
	defer s.Close()
	if s.Zstd != zstd {
		t.Errorf("compression %v, asked %v", s.Zstd, zstd)
	}
	s.WriteFrame(7, []byte("pages"))
	s.Flush()
	if typ, p, err := s.ReadFrame(nil); err != nil || typ != 8 || string(p) != "ack" {
		return errors.Join(err, errors.New("no ack")), <-serr
	}
	return nil, <-serr
}

func TestPlainAndZstd(t *testing.T) {
	for _, z := range []bool{false, true} {
		if ce, se := roundTrip(t, TLS{}, TLS{}, z); ce != nil || se != nil {
			t.Fatalf("zstd=%v: client %v, server %v", z, ce, se)
		}
	}
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	good, other := newCA(t, "ferry-ca"), newCA(t, "other-ca")
	sc, sk := good.issue(t, dir, "server", 10)
	cc, ck := good.issue(t, dir, "client", 11)
	rc, rk := good.issue(t, dir, "revoked", 12)
	xc, xk := other.issue(t, dir, "stranger", 13)
	caPath := good.write(t, dir, "ca.pem")
	crl := good.crl(t, dir, 12)
	srv := TLS{Enabled: true, CACert: caPath, CRL: crl, Cert: sc, Key: sk}

	if ce, se := roundTrip(t, srv, TLS{Enabled: true, CACert: caPath, Cert: cc, Key: ck}, true); ce != nil || se != nil {
		t.Fatalf("good client: client %v, server %v", ce, se)
	}
	// A client whose certificate comes from another CA is refused.
	_, se := roundTrip(t, srv, TLS{Enabled: true, CACert: caPath, Cert: xc, Key: xk}, false)
	if se == nil || !strings.Contains(se.Error(), "certificate") {
		t.Fatalf("foreign client: server error %v", se)
	}
	// A revoked client is refused, and the error says so.
	_, se = roundTrip(t, srv, TLS{Enabled: true, CACert: caPath, Cert: rc, Key: rk}, false)
	if !errors.Is(se, ErrRevoked) && (se == nil || !strings.Contains(se.Error(), "revoked")) {
		t.Fatalf("revoked client: server error %v", se)
	}
	// A client that does not trust the server's CA refuses the server.
	otherPath := other.write(t, dir, "other.pem")
	ce, _ := roundTrip(t, srv, TLS{Enabled: true, CACert: otherPath, Cert: cc, Key: ck}, false)
	if ce == nil || !strings.Contains(ce.Error(), "TLS handshake") {
		t.Fatalf("server from an untrusted CA: client error %v", ce)
	}
}
