// Command rafs-image builds, merges, inspects, checks and unpacks RAFS
// (Nydus) images. Its subcommands and flag names follow nydus-image where
// they overlap, so scripts written for nydus-image keep working:
//
//	rafs-image create [--type dir-rafs|tar-rafs] --bootstrap F (--blob F | --blob-dir D) SOURCE
//	rafs-image merge --bootstrap OUT LAYER-BOOTSTRAP...
//	rafs-image inspect [--json] [-R stats|files|chunks|blobs] BOOTSTRAP
//	rafs-image check --bootstrap F [--blob-dir D | --blob F]
//	rafs-image unpack --bootstrap F (--blob-dir D | --blob F) --output DIR|FILE.tar
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/rafsd/rafsd/internal/version"
)

type command struct {
	name  string
	usage string
	run   func(args []string, stdin io.Reader, stdout io.Writer) error
}

var commands = []command{
	{"create", "build an image from a directory or a layer tar", runCreate},
	{"merge", "merge layer bootstraps (lowest first) into one", runMerge},
	{"inspect", "show an image's files, chunks, blobs and stats", runInspect},
	{"check", "validate a bootstrap and, with blobs, every chunk digest", runCheck},
	{"unpack", "write an image out as a directory or a tar", runUnpack},
	{"convert", "convert an OCI image to a Nydus image and push it", runConvert},
}

// errUsage marks errors that should be followed by the usage text.
var errUsage = errors.New("usage")

func main() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "--version" || args[0] == "-V" || args[0] == "version" {
		fmt.Fprintln(stdout, "rafs-image", version.String())
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			if err := c.run(args[1:], stdin, stdout); err != nil {
				if errors.Is(err, flag.ErrHelp) {
					return 0
				}
				fmt.Fprintf(stderr, "rafs-image %s: %v\n", c.name, err)
				return 1
			}
			return 0
		}
	}
	fmt.Fprintf(stderr, "rafs-image: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: rafs-image <command> [flags] [args]   (rafs-image <command> --help for flags)")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.usage)
	}
	fmt.Fprintln(w, "  --version")
}

// parse parses flags and positional arguments in any order (nydus-image,
// built on clap, accepts both), returning the positional ones.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(os.Stderr)
				fs.PrintDefaults()
			}
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if rest[0] == "--" {
			return append(pos, rest[1:]...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }
