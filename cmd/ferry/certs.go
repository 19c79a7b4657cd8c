package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/pki"
)

func init() { register(newCertsCmd) }

// The certificate directory: ca.crt and ca.key, a serial counter, node
// certificates NAME.crt/NAME.key, and crl.pem with the revoked serials
// (revoked, one per line, is its source).
const (
	caCertFile  = "ca.crt"
	caKeyFile   = "ca.key"
	serialFile  = "serial"
	revokedFile = "revoked"
	crlFile     = "crl.pem"
	// gossipKeyFile: the key that encrypts the agents' cluster gossip.
	gossipKeyFile = "gossip.key"
)

func newCertsCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "make the certificates ferry's TLS streams (and agents) authenticate with",
		Long: `Bootstrap a certificate authority and issue node certificates for the mutual
TLS of page servers, lazy-pages daemons and dumps (--tls, --tls-cacert,
--tls-cert, --tls-key, --tls-cacrl). Keys are ECDSA P-256 in PEM, mode 0600;
the CA key never leaves the certificate directory (--dir).`,
		Example: `  ferry certs init --dir /etc/ferry/pki
  ferry certs issue --dir /etc/ferry/pki node-a --host 10.0.0.1 --host node-a.example
  ferry page-server -D /srv/ckpt --port 27000 --tls --tls-cacert /etc/ferry/pki/ca.crt \
      --tls-cert /etc/ferry/pki/node-a.crt --tls-key /etc/ferry/pki/node-a.key
  ferry certs revoke --dir /etc/ferry/pki node-b     # then pass --tls-cacrl crl.pem`,
	}
	cmd.PersistentFlags().StringVar(&dir, "dir", ".", "the certificate directory")

	var name string
	var years int
	initCmd := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "create the certificate authority (ca.crt, ca.key) and the agents' gossip key (gossip.key)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := os.Stat(filepath.Join(dir, caKeyFile)); err == nil {
				return fmt.Errorf("certs: %s already holds a CA (%s); remove it first to make a new one", dir, caKeyFile)
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			ca, err := pki.NewCA(name, time.Duration(years)*365*24*time.Hour)
			if err != nil {
				return err
			}
			if err := ca.WriteKey(filepath.Join(dir, caKeyFile)); err != nil {
				return err
			}
			if err := ca.WriteCert(filepath.Join(dir, caCertFile)); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(dir, serialFile), []byte("2\n"), 0o600); err != nil {
				return err
			}
			// The agents' gossip key (ferry agent --gossip-key).
			gk := make([]byte, 32)
			if _, err := rand.Read(gk); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(dir, gossipKeyFile), []byte(base64.StdEncoding.EncodeToString(gk)+"\n"), 0o600); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), filepath.Join(dir, caCertFile))
			return nil
		},
	}
	initCmd.Flags().StringVar(&name, "name", "ferry cluster CA", "the CA's common name")
	initCmd.Flags().IntVar(&years, "years", 10, "validity in years")

	var hosts []string
	var days int
	issueCmd := &cobra.Command{
		Use:   "issue --dir DIR NAME [--host H]...",
		Short: "issue NAME.crt and NAME.key, for server and client use",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := pki.LoadCA(filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile))
			if err != nil {
				return fmt.Errorf("certs: %w (run ferry certs init first)", err)
			}
			node := args[0]
			if strings.ContainsAny(node, "/\\") || node == "ca" || node == "" {
				return fmt.Errorf("certs: %q cannot be a certificate name", node)
			}
			serial, err := nextSerial(dir)
			if err != nil {
				return err
			}
			crt, key, err := ca.Issue(dir, node, serial, time.Duration(days)*24*time.Hour, hosts...)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n%s\nserial %d\n", crt, key, serial)
			return nil
		},
	}
	issueCmd.Flags().StringArrayVar(&hosts, "host", nil, "an IP address or DNS name the certificate is for (repeatable; default 127.0.0.1)")
	issueCmd.Flags().IntVar(&days, "days", 365, "validity in days")

	revokeCmd := &cobra.Command{
		Use:   "revoke --dir DIR NAME|SERIAL...",
		Short: "add certificates to crl.pem (pass it as --tls-cacrl)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := pki.LoadCA(filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile))
			if err != nil {
				return fmt.Errorf("certs: %w", err)
			}
			serials, err := readSerials(filepath.Join(dir, revokedFile))
			if err != nil {
				return err
			}
			for _, a := range args {
				s, err := serialOf(dir, a)
				if err != nil {
					return err
				}
				serials = append(serials, s)
			}
			var b strings.Builder
			for _, s := range serials {
				fmt.Fprintln(&b, s)
			}
			if err := os.WriteFile(filepath.Join(dir, revokedFile), []byte(b.String()), 0o600); err != nil {
				return err
			}
			if err := ca.CRL(filepath.Join(dir, crlFile), serials...); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), filepath.Join(dir, crlFile))
			return nil
		},
	}
	cmd.AddCommand(initCmd, issueCmd, revokeCmd)
	return cmd
}

// nextSerial takes the next certificate serial from the directory.
func nextSerial(dir string) (int64, error) {
	p := filepath.Join(dir, serialFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("certs: %w", err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n < 2 {
		return 0, fmt.Errorf("certs: %s: not a serial number", p)
	}
	return n, os.WriteFile(p, []byte(strconv.FormatInt(n+1, 10)+"\n"), 0o600)
}

func readSerials(path string) ([]int64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []int64
	for _, f := range strings.Fields(string(b)) {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("certs: %s: %q is not a serial", path, f)
		}
		out = append(out, n)
	}
	return out, nil
}

// serialOf resolves a certificate name (NAME.crt in dir) or a number.
func serialOf(dir, arg string) (int64, error) {
	if n, err := strconv.ParseInt(arg, 10, 64); err == nil {
		return n, nil
	}
	cert, err := pki.ReadCert(filepath.Join(dir, arg+".crt"))
	if err != nil {
		return 0, fmt.Errorf("certs: %s: %w", arg, err)
	}
	return cert.SerialNumber.Int64(), nil
}
