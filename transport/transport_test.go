package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrycr/ferry/internal/testutil"
)

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
	good, other := testutil.NewCA(t, "ferry-ca"), testutil.NewCA(t, "other-ca")
	sc, sk := good.Issue(t, dir, "server", 10)
	cc, ck := good.Issue(t, dir, "client", 11)
	rc, rk := good.Issue(t, dir, "revoked", 12)
	xc, xk := other.Issue(t, dir, "stranger", 13)
	caPath := good.Write(t, dir, "ca.pem")
	crl := good.CRL(t, dir, 12)
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
	otherPath := other.Write(t, dir, "other.pem")
	ce, _ := roundTrip(t, srv, TLS{Enabled: true, CACert: otherPath, Cert: cc, Key: ck}, false)
	if ce == nil || !strings.Contains(ce.Error(), "TLS handshake") {
		t.Fatalf("server from an untrusted CA: client error %v", ce)
	}
}

func TestQUIC(t *testing.T) {
	dir := t.TempDir()
	good, other := testutil.NewCA(t, "ferry-ca"), testutil.NewCA(t, "other-ca")
	sc, sk := good.Issue(t, dir, "server", 20)
	cc, ck := good.Issue(t, dir, "client", 21)
	xc, xk := other.Issue(t, dir, "stranger", 22)
	caPath := good.Write(t, dir, "ca.pem")
	srv := TLS{Enabled: true, CACert: caPath, Cert: sc, Key: sk}

	if _, err := ListenOn(QUIC, "127.0.0.1:0", TLS{}, nil); !errors.Is(err, ErrQUICNeedsTLS) {
		t.Fatalf("quic without TLS: %v", err)
	}
	rejected := make(chan error, 4)
	l, err := ListenOn(QUIC, "127.0.0.1:0", srv, func(err error) { rejected <- err })
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	served := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			served <- err
			return
		}
		s, err := Server(c)
		if err == nil {
			var p []byte
			_, p, err = s.ReadFrame(nil)
			if err == nil {
				err = s.WriteFrame(2, append([]byte("echo:"), p...))
				s.Flush()
			}
			s.Close()
		}
		served <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A client from another CA is refused, and the server hears about it.
	// (In TLS 1.3 the client finishes its handshake before the server has
	// checked the client's certificate: the refusal shows at first use.)
	if xcn, err := DialOn(ctx, QUIC, l.Addr().String(), TLS{Enabled: true, CACert: caPath, Cert: xc, Key: xk}); err == nil {
		xcn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := Client(xcn, false); err == nil {
			t.Fatal("foreign client got through the hello over QUIC")
		}
		xcn.Close()
	}
	select {
	case err := <-rejected:
		if !strings.Contains(err.Error(), "stranger") {
			t.Fatalf("rejection does not name the peer: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("refused QUIC peer not reported")
	}
	c, err := DialOn(ctx, QUIC, l.Addr().String(), TLS{Enabled: true, CACert: caPath, Cert: cc, Key: ck})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Client(c, true)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Zstd {
		t.Error("zstd not negotiated")
	}
	s.WriteFrame(1, []byte("pages"))
	s.Flush()
	typ, p, err := s.ReadFrame(nil)
	if err != nil || typ != 2 || string(p) != "echo:pages" {
		t.Fatalf("reply %d %q %v", typ, p, err)
	}
	s.Close()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

// TestLargeFramesInOrder: frames from directWrite on go to a plain TCP
// socket from the caller's buffer, after what small frames left buffered;
// the reader gets them in order, whole, read at once or head and body
// apart.
func TestLargeFramesInOrder(t *testing.T) {
	l, err := Listen("127.0.0.1:0", TLS{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	sizes := []int{3, directWrite, 5, 1 << 20, directWrite - 1, 2 << 20}
	frame := func(i int) []byte {
		p := make([]byte, sizes[i])
		for j := range p {
			p[j] = byte(i + j/4096)
		}
		return p
	}
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		s, err := Server(c)
		if err != nil {
			c.Close()
			return
		}
		defer s.Close()
		for i := range sizes {
			s.WriteFrame(uint8(i), frame(i)) // small ones stay buffered
		}
		s.Flush()
		s.ReadFrame(nil) // until the client is done
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, l.Addr().String(), TLS{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Client(c, false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range sizes {
		var typ uint8
		var p []byte
		if i%2 == 0 {
			typ, p, err = s.ReadFrame(nil)
		} else {
			var n int
			if typ, n, err = s.ReadHead(); err == nil {
				p = make([]byte, n)
				err = errors.Join(s.ReadBody(p[:n/2]), s.ReadBody(p[n/2:]))
			}
		}
		if err != nil || typ != uint8(i) || !bytes.Equal(p, frame(i)) {
			t.Fatalf("frame %d: type %d, %d bytes, %v", i, typ, len(p), err)
		}
	}
}

// A second stream to the same server resumes the first's TLS session
// (no second mutual handshake); another client identity does not.
func TestTLSResumption(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewCA(t, "ferry-ca")
	sc, sk := ca.Issue(t, dir, "server", 10)
	caPath := ca.Write(t, dir, "ca.pem")
	l, err := Listen("127.0.0.1:0", TLS{Enabled: true, CACert: caPath, Cert: sc, Key: sk})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if s, err := Server(c); err == nil {
					s.WriteFrame(8, []byte("ack"))
					s.Flush()
					s.ReadFrame(nil)
				}
			}()
		}
	}()
	dial := func(name string, serial int64) bool {
		cc, ck := ca.Issue(t, dir, name, serial)
		c, err := Dial(context.Background(), l.Addr().String(), TLS{Enabled: true, CACert: caPath, Cert: cc, Key: ck})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s, err := Client(c, false)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.ReadFrame(nil); err != nil { // the session ticket comes with it
			t.Fatal(err)
		}
		return c.(*tls.Conn).ConnectionState().DidResume
	}
	if dial("client", 11) {
		t.Fatal("the first stream resumed a session")
	}
	if !dial("client", 11) {
		t.Error("the second stream of the same client did not resume the first's session")
	}
	if dial("other", 12) {
		t.Error("another client identity resumed a session")
	}
}

// countingConn counts the bytes written through it.
type countingConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// pipeStreams returns the two ends of an in-memory stream that agreed on
// flags, and the byte count of the first end's writes.
func pipeStreams(t *testing.T, flags uint16) (*Stream, *Stream, *countingConn) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	ca := &countingConn{Conn: a}
	sa, err := newStream(ca, flags)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := newStream(b, flags)
	if err != nil {
		t.Fatal(err)
	}
	return sa, sb, ca
}

// Block compression: pages that compress go compressed, random ones as
// they are (a sample tells), small frames gathered in blocks; a reader may
// take a payload in parts. Streams agreeing only on FlagZstd (an older
// peer) still compress the stream whole.
func TestBlockCompression(t *testing.T) {
	text := bytes.Repeat([]byte("ferry moves processes between hosts; "), 512<<10/37+1)[:512<<10]
	random := make([]byte, 512<<10)
	rand.Read(random)
	mixed := append(append([]byte{}, random[:256<<10]...), text[:256<<10]...)
	frames := [][]byte{text, random, []byte("ack"), text[:3000], mixed, text, nil}
	for i := range 200 { // runs of a few pages, as a fragmented dump writes them
		f := make([]byte, 4096*(1+i%6))
		rand.Read(f)
		frames = append(frames, f)
	}
	frames = append(frames, text[:directWrite-1], text[:directWrite])
	var all int
	for _, f := range frames {
		all += len(f)
	}
	for _, flags := range []uint16{FlagZstd | FlagZstdFrames, FlagZstd} {
		w, r, counted := pipeStreams(t, flags)
		sent := make(chan error, 1)
		go func() {
			for i, f := range frames {
				if err := w.WriteFrame(uint8(i), f); err != nil {
					sent <- err
					return
				}
			}
			sent <- w.Flush()
		}()
		for i, f := range frames {
			var got []byte
			typ, n, err := r.ReadHead()
			if err == nil {
				got = make([]byte, n)
				err = errors.Join(r.ReadBody(got[:n/3]), r.ReadBody(got[n/3:]))
			}
			if err != nil || typ != uint8(i) || !bytes.Equal(got, f) {
				t.Fatalf("flags %#x, frame %d: type %d, %d bytes (want %d), %v", flags, i, typ, len(got), len(f), err)
			}
		}
		if err := <-sent; err != nil {
			t.Fatal(err)
		}
		// The random bytes go as they are; the text shrinks (but for
		// what shares a block with random runs).
		randomBytes := int64(len(random) + len(random)/2)
		for _, f := range frames[7:207] {
			randomBytes += int64(len(f))
		}
		if n := counted.n.Load(); n > randomBytes+160<<10 || (flags&FlagZstdFrames != 0 && n < randomBytes) {
			t.Errorf("flags %#x: %d bytes on the wire for %d of frames, %d of them random", flags, n, all, randomBytes)
		}
	}
	bw, err := newBlockWriter(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if z := bw.squeeze(random); z != nil {
		t.Errorf("random pages compressed to %d bytes", len(z))
	}
	if z := bw.squeeze(text); z == nil || len(z) > len(text)/10 {
		t.Errorf("text compressed to %d bytes", len(z))
	}
}

// A block that does not decode to what its header says is an error naming
// it, not a panic or a short read.
func TestCorruptBlock(t *testing.T) {
	bw, err := newBlockWriter(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	text := bytes.Repeat([]byte("abcd"), 4096)
	z := append([]byte{}, bw.squeeze(text)...)
	for _, c := range []struct {
		name, want string
		block      []byte
	}{
		{"garbage", "compressed block", append([]byte{blockZstd, 4, 0, 0, 0, 0, 16, 0, 0}, "junk"...)},
		{"wrong length", "not the 1 its header says", append([]byte{blockZstd, byte(len(z)), byte(len(z) >> 8), 0, 0, 1, 0, 0, 0}, z...)},
		{"too large", "exceeds", []byte{blockZstd, 4, 0, 0, 0, 0, 0, 0, 2}},
		{"unknown kind", "unknown block kind 7", []byte{7, 0, 0, 0, 0}},
		{"cut short", "unexpected EOF", append([]byte{blockZstd, 200, 0, 0, 0, 0, 16, 0, 0}, "junk"...)},
	} {
		r, err := newBlockReader(bytes.NewReader(c.block))
		if err != nil {
			t.Fatal(err)
		}
		s := &Stream{r: r}
		if _, _, err := s.ReadHead(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}
