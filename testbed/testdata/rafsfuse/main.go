// Command rafsfuse serves a RAFS image over FUSE with package rafs/fs and an
// uncached blob reader: a stand-in for `rafsd` in guest FUSE scenarios until
// the daemon's FUSE mode is available. Built by the tests only (testdata is
// not part of ./...).
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	rafsfs "github.com/rafsd/rafsd/rafs/fs"
)

func main() {
	boot := flag.String("bootstrap", "", "RAFS bootstrap file")
	blobDir := flag.String("blob-dir", "", "directory of blobs named by blob id")
	mnt := flag.String("mountpoint", "", "where to mount")
	flag.Parse()
	if err := run(*boot, *blobDir, *mnt); err != nil {
		fmt.Fprintln(os.Stderr, "rafsfuse:", err)
		os.Exit(1)
	}
}

func run(boot, blobDir, mnt string) error {
	img, err := bootstrap.Open(boot)
	if err != nil {
		return err
	}
	cr := rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) {
		return os.Open(filepath.Join(blobDir, filepath.Base(b.ID)))
	}}
	srv, err := fuse.NewServer(rafsfs.New(img, cr, rafsfs.DefaultOptions()), mnt, &fuse.MountOptions{
		FsName: "rafs", Name: "rafsfuse", DirectMount: true, MaxWrite: 1 << 20,
	})
	if err != nil {
		return fmt.Errorf("mount %s: %w", mnt, err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		return err
	}
	fmt.Println("mounted", mnt)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return srv.Unmount()
}
