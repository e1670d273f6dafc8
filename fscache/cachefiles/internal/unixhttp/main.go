// Command unixhttp sends one HTTP request to a unix-socket API, for guest
// scenarios (the guest has no curl):
//
//	unixhttp SOCKET METHOD PATH [BODY-FILE]
//
// It prints the status code on the first line and the body after, and
// exits 1 for a status of 300 or more.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: unixhttp SOCKET METHOD PATH [BODY-FILE]")
		os.Exit(2)
	}
	sock, method, path := os.Args[1], os.Args[2], os.Args[3]
	var body io.Reader = strings.NewReader("")
	if len(os.Args) > 4 {
		b, err := os.ReadFile(os.Args[4])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		body = strings.NewReader(string(b))
	}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	req, err := http.NewRequest(method, "http://api"+path, body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	resp, err := c.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	fmt.Printf("%d\n%s", resp.StatusCode, b)
	if resp.StatusCode >= 300 {
		os.Exit(1)
	}
}
