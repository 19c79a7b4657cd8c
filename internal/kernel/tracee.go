package kernel

import (
	"errors"
	"fmt"
	"os"
	"os/exec"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// tracee returns the probe of a feature exercised on a traced child. One
// child serves every such feature; its results are cached together.
func tracee(name string) func(*Probes) error {
	return func(p *Probes) error {
		p.traceeOnce.Do(func() { p.tracee = traceeSession() })
		if err, ok := p.tracee[name]; ok {
			return err
		}
		return fmt.Errorf("probe %s did not run", name)
	}
}

// traceeSession starts a sleeping child, exercises every ptrace-side
// mechanism on it, and kills and reaps it by PID.
func traceeSession() map[string]error {
	res := map[string]error{}
	all := func(err error) map[string]error {
		for _, n := range []string{"ptrace-seize", "ptrace-xstate", "ptrace-sigmask", "ptrace-peeksiginfo",
			"ptrace-rseq", "process-vm-rw", "pidfd-getfd", "kcmp"} {
			if _, ok := res[n]; !ok {
				res[n] = err
			}
		}
		return res
	}
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		return all(fmt.Errorf("start probe child: %w", err))
	}
	pid := cmd.Process.Pid
	defer func() {
		unix.Kill(pid, unix.SIGKILL)
		cmd.Wait()
	}()
	tr := ptrace.NewThread()
	defer tr.Close()
	tr.Do(func() error {
		if err := ptrace.Seize(pid, ptrace.OptsDump); err != nil {
			res["ptrace-seize"] = missingIf(err)
			return nil
		}
		defer ptrace.Detach(pid, 0)
		if err := ptrace.Interrupt(pid); err != nil {
			res["ptrace-seize"] = missingIf(err)
			return nil
		}
		for {
			st, err := ptrace.Wait(pid)
			if err != nil {
				res["ptrace-seize"] = err
				return nil
			}
			if st.Event() == ptrace.EventStop {
				break
			}
			if st.Exited() {
				res["ptrace-seize"] = errors.New("probe child exited")
				return nil
			}
			ptrace.Cont(pid, st.Sig())
		}
		res["ptrace-seize"] = nil
		xs, err := ptrace.GetXstate(pid)
		if err == nil && len(xs) < 576 {
			err = fmt.Errorf("xstate of %d bytes is shorter than an XSAVE area", len(xs))
		}
		res["ptrace-xstate"] = missingIf(err)
		m, err := ptrace.GetSigmask(pid)
		if err == nil {
			err = ptrace.SetSigmask(pid, m)
		}
		res["ptrace-sigmask"] = missingIf(err)
		_, err = ptrace.PeekSiginfo(pid, false)
		res["ptrace-peeksiginfo"] = missingIf(err)
		_, err = ptrace.GetRseqConfig(pid)
		res["ptrace-rseq"] = missingIf(err)
		regs, err := ptrace.GetRegs(pid)
		if err == nil {
			buf := make([]byte, 64)
			err = compel.ReadMem(pid, []compel.Segment{{Addr: regs.Rsp, Local: buf}})
		}
		res["process-vm-rw"] = missingIf(err)
		res["pidfd-getfd"] = missingIf(pidfdGetfd(pid))
		res["kcmp"] = missingIf(kcmpSelf(pid))
		return nil
	})
	return all(errors.New("not probed"))
}

func missingIf(err error) error {
	if err != nil && isMissing(err) {
		return missing("", err)
	}
	return err
}

func pidfdGetfd(pid int) error {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pfd)
	fd, err := unix.PidfdGetfd(pfd, 1, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_getfd", err)
	}
	return unix.Close(fd)
}
