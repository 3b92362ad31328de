package pathbench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ServeProxy serves Go's reverse proxy to upstream on ln until ctx ends:
// FlushInterval -1 (each write of the upstream's stream is flushed at
// once), an idle pool large enough for any concurrency of the bench, and
// request bodies read whole before they are sent on, as nginx does by
// default (proxy_request_buffering).
func ServeProxy(ctx context.Context, ln net.Listener, upstream string) error {
	u, err := url.Parse(upstream)
	if err != nil {
		return fmt.Errorf("proxy upstream: %w", err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	rp.Transport = &http.Transport{MaxIdleConns: 2048, MaxIdleConnsPerHost: 2048, IdleConnTimeout: time.Minute}
	srv := &http.Server{Handler: bufferBody(rp), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// bufferBody reads a request's body (up to maxRequest) before next sees
// it. Unbuffered, the incoming body is shared by two goroutines: the
// upstream transport's writer still reads it when the proxy's server,
// about to send the response headers, discards and closes it. The
// writer then fails with "invalid Read on closed Body" and the transport
// closes the upstream connection under the answer being copied, which
// the client sees as a cut answer (about 1 query in 20 at c=1 when the
// proxy runs as its own process).
func bufferBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequest))
		if err != nil {
			code := http.StatusBadRequest
			if mbe := new(http.MaxBytesError); errors.As(err, &mbe) {
				code = http.StatusRequestEntityTooLarge
			}
			http.Error(w, "request body: "+err.Error(), code)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		next.ServeHTTP(w, r)
	})
}

// Nginx is an nginx master process with one worker, proxying a loopback
// port to an upstream with keep-alive connections and no buffering.
type Nginx struct {
	cmd  *exec.Cmd
	url  string
	dir  string
	errs *bytes.Buffer
}

// NginxPath is the nginx binary on PATH, or "" when there is none.
func NginxPath() string {
	p, err := exec.LookPath("nginx")
	if err != nil {
		return ""
	}
	return p
}

// freePort asks the kernel for a loopback port nobody uses now.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// nginxConf is what a central deployment would run in front of a model
// server: keep-alive upstream, HTTP/1.1, proxy_buffering off.
const nginxConf = `daemon off;
master_process on;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream backend { server %[2]s; keepalive 1024; }
  server {
    listen 127.0.0.1:%[3]d;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }
  }
}
`

// StartNginx runs nginx (binary bin) in front of upstream (host:port) on
// a loopback port, its files in a temporary directory.
func StartNginx(ctx context.Context, bin, upstream string) (*Nginx, error) {
	dir, err := os.MkdirTemp("", "mtor-bench-nginx-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, nginxConf, dir, upstream, port), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	n := &Nginx{url: "http://127.0.0.1:" + strconv.Itoa(port), dir: dir, errs: &bytes.Buffer{}}
	n.cmd = exec.Command(bin, "-p", dir, "-c", conf, "-e", "stderr")
	n.cmd.Stderr = n.errs
	if err := n.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("nginx: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := waitReady(wctx, n.url+"/v1/models"); err != nil {
		n.Close()
		return nil, fmt.Errorf("nginx: %w: %s", err, strings.TrimSpace(n.errs.String()))
	}
	return n, nil
}

// URL is nginx's base URL.
func (n *Nginx) URL() string { return n.url }

// WorkerPID is the pid of nginx's worker process (the one that proxies).
func (n *Nginx) WorkerPID() (int, error) {
	pid := n.cmd.Process.Pid
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return 0, fmt.Errorf("nginx worker: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) != 1 {
		return 0, fmt.Errorf("nginx worker: master has children %q, want one", f)
	}
	return strconv.Atoi(f[0])
}

// Close stops nginx (SIGTERM: fast shutdown) and removes its files.
func (n *Nginx) Close() {
	_ = n.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = n.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = n.cmd.Process.Kill()
		<-done
	}
	os.RemoveAll(n.dir)
}
