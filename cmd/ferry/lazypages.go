package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/lazypages"
)

func init() { register(newLazyPagesCmd) }

func newLazyPagesCmd() *cobra.Command {
	var (
		c        common
		statusFd int
		ps       psFlags
		rate     string
	)
	cmd := &cobra.Command{
		Use:   "lazy-pages -D DIR [-W DIR] [--status-fd FD]",
		Short: "serve a restored process's memory on demand (post-copy)",
		Long: `Run the post-copy daemon for a "ferry restore --lazy-pages" of the same
images. It listens on lazy-pages.socket in the work directory (-W, default
the images directory); the restore hands it the userfaultfd of the process
it recreated, with the process's private anonymous memory left empty, and
resumes the process at once. The daemon then copies each page the process
touches (64 KiB around the fault), copies everything else in the
background, and exits when every page is delivered. Pages the process
discards meanwhile (madvise, munmap) are not brought back; pages moved by
mremap follow their mapping.

--status-fd FD writes one zero byte to FD once the socket listens, as
criu does, so a script can start the restore without polling.

With --page-server --address A --port P the pages come from a page server
in lazy mode ("ferry page-server --lazy-pages" with the dump, or the source
itself with "ferry dump --lazy-pages"); the images directory then needs
everything but the pages files. --tls and --compress apply.

A process that forks during post-copy is served too: the child's missing
pages come from the same images.

--prefetch-rate limits the background copy (e.g. 100M: 100 MiB/s) to
spare a shared link; pages the process touches are always served at once.

If the daemon fails before every page is delivered (page server lost, a
signal), it kills the restored processes and all they forked and exits 1:
they would otherwise read zeros where their memory never arrived.`,
		Example: `  ferry lazy-pages -D ckpt --status-fd 3 3>ready &
  ferry restore -D ckpt --lazy-pages -d`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			opts := lazypages.Options{
				ImagesDir: c.imagesDir,
				Socket:    filepath.Join(c.workDirOrImages(), lazypages.SocketName),
				Logger:    log,
			}
			if statusFd >= 0 {
				opts.Ready = func() { writeStatus(statusFd) }
			}
			if opts.PrefetchRate, err = parseRate(rate); err != nil {
				return err
			}
			remote, err := ps.remoteSource(cmd)
			if err != nil {
				return err
			}
			if remote != nil {
				opts.Remote = remote
				defer remote.Close()
			}
			st, err := lazypages.Serve(cmd.Context(), opts)
			if err != nil {
				return err
			}
			log.Info("lazy-pages finished", "faults", st.Faults, "pages", st.PagesCopied, "took", st.Duration)
			return nil
		},
	}
	c.addFlags(cmd.Flags())
	ps.addFlags(cmd.Flags(), true)
	cmd.Flags().IntVar(&statusFd, "status-fd", -1, "write a zero byte to FD when ready")
	cmd.Flags().StringVar(&rate, "prefetch-rate", "", "limit the background copy to this many bytes per second (K, M, G suffixes)")
	return cmd
}

// parseRate parses --prefetch-rate (0 if not given).
func parseRate(rate string) (int64, error) {
	if rate == "" {
		return 0, nil
	}
	v, err := parseSize(rate)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("--prefetch-rate %q: want bytes per second, e.g. 100M", rate)
	}
	return v, nil
}

// writeStatus writes criu's readiness byte to fd and closes it.
func writeStatus(fd int) {
	f := os.NewFile(uintptr(fd), fmt.Sprintf("status-fd %d", fd))
	f.Write([]byte{0})
	f.Close()
}

// lazyDaemon is the lazy-pages daemon that "restore --lazy-pages
// --page-server" runs in itself (nil: none).
type lazyDaemon struct {
	*lazypages.Daemon
	log *slog.Logger
}

// startLazyDaemon connects to the page server in the background and
// starts serving on a fresh socket; it returns once the socket listens.
func startLazyDaemon(ctx context.Context, ps *psFlags, imagesDir string, rate int64, log *slog.Logger) (*lazyDaemon, error) {
	if ps.socketFd >= 0 {
		return nil, errors.New("--ps-socket: a restore connects to its page server itself (--page-server --address --port)")
	}
	addr, err := ps.addr()
	if err != nil {
		return nil, err
	}
	dctx, dcancel := context.WithCancel(ctx)
	remote := lazypages.DialAsync(dctx, ps.network, addr, ps.tls, ps.compress)
	d, err := lazypages.Start(ctx, lazypages.Options{ImagesDir: imagesDir, PrefetchRate: rate, Logger: log}, remote, dcancel)
	if err != nil {
		return nil, err
	}
	return &lazyDaemon{Daemon: d, log: log}, nil
}

// wait waits until every page arrived.
func (d *lazyDaemon) wait() error {
	if d == nil {
		return nil
	}
	<-d.Done()
	if d.Err != nil {
		return fmt.Errorf("post-copy failed, the restored processes were killed: %w", d.Err)
	}
	d.log.Info("lazy-pages finished", "faults", d.Stats.Faults, "pages", d.Stats.PagesCopied, "took", d.Stats.Duration)
	return nil
}

// stop ends the daemon (a restore that failed before handing it its
// processes) and waits for it.
func (d *lazyDaemon) stop() {
	if d != nil {
		d.Stop()
	}
}
