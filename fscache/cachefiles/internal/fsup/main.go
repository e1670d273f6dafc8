// Command fsup is nydus-snapshotter's supervisor side of the daemon
// takeover protocol, for the guest scenarios: it keeps the state and the
// fd a daemon hands over, and gives them to the next daemon that asks.
//
//	fsup -sock SUPERVISOR.sock -ctl CONTROL.sock
//
// As nydus-snapshotter does, it listens on the supervisor socket only when
// it expects a daemon: PUT /recv on the control socket (an HTTP API, driven
// with unixhttp) starts listening for one daemon's sendfd, PUT /send for
// one daemon's takeover; both return at once, and GET /wait blocks until
// that exchange ended (200, or 500 with the error). GET /state returns the
// state held.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/fusedev"
)

type supervisor struct {
	sock string
	log  *slog.Logger

	mu      sync.Mutex
	state   []byte
	fd      int
	pending chan error // the running exchange's result
}

func main() {
	sock := flag.String("sock", "/run/supervisor.sock", "supervisor socket daemons connect to")
	ctl := flag.String("ctl", "/run/supervisor-ctl.sock", "control API socket")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	s := &supervisor{sock: *sock, log: log, fd: -1}
	os.Remove(*ctl)
	l, err := net.Listen("unix", *ctl)
	if err != nil {
		log.Error("fsup", "err", err)
		os.Exit(1)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /recv", func(w http.ResponseWriter, r *http.Request) { s.begin(w, s.recv) })
	mux.HandleFunc("PUT /send", func(w http.ResponseWriter, r *http.Request) { s.begin(w, s.send) })
	mux.HandleFunc("GET /wait", s.wait)
	mux.HandleFunc("GET /state", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		w.Write(s.state)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("fsup listening", "sock", *sock, "ctl", *ctl)
	<-ctx.Done()
	srv.Close()
}

// begin listens on the supervisor socket and runs one exchange on the
// first connection in the background.
func (s *supervisor) begin(w http.ResponseWriter, exchange func(*net.UnixConn) error) {
	s.mu.Lock()
	if s.pending != nil {
		s.mu.Unlock()
		http.Error(w, "an exchange is pending: GET /wait first", http.StatusConflict)
		return
	}
	os.Remove(s.sock)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.sock, Net: "unix"})
	if err != nil {
		s.mu.Unlock()
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	ch := make(chan error, 1)
	s.pending = ch
	s.mu.Unlock()
	go func() {
		defer l.Close()
		l.SetDeadline(time.Now().Add(60 * time.Second))
		c, err := l.AcceptUnix()
		if err == nil {
			c.SetDeadline(time.Now().Add(20 * time.Second))
			err = exchange(c)
			c.Close()
		}
		if err != nil {
			s.log.Error("fsup: exchange failed", "err", err)
		}
		ch <- err
	}()
	w.WriteHeader(http.StatusNoContent)
}

func (s *supervisor) wait(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	ch := s.pending
	s.mu.Unlock()
	if ch == nil {
		http.Error(w, "nothing pending", http.StatusConflict)
		return
	}
	err := <-ch
	s.mu.Lock()
	s.pending = nil
	n := len(s.state)
	s.mu.Unlock()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	fmt.Fprintf(w, "ok %d\n", n)
}

// recv keeps what a daemon sends (its sendfd): state bytes until EOF and
// one fd.
func (s *supervisor) recv(c *net.UnixConn) error {
	state, fd, err := fusedev.ReadState(c)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd >= 0 {
		unix.Close(s.fd) // the same device again: a newer state replaces it
	}
	s.state, s.fd = state, fd
	s.log.Info("fsup: received state", "bytes", len(state))
	return nil
}

// send gives the held state and fd to a daemon taking over; the
// supervisor keeps its copy, as nydus-snapshotter does.
func (s *supervisor) send(c *net.UnixConn) error {
	s.mu.Lock()
	state, fd := s.state, s.fd
	s.mu.Unlock()
	if fd < 0 {
		return errors.New("no state held")
	}
	if err := fusedev.WriteState(c, state, fd); err != nil {
		return err
	}
	s.log.Info("fsup: sent state", "bytes", len(s.state))
	return nil
}
