// loadtool: the bench's fast upstream, sinks and load generators (Go standard library only).
//
// bench/bench.py builds it with `go build` into a cache folder outside the repository and runs
// it pinned to the load core.  Subcommands:
//
//	upstream  -listen ADDR -response FILE -chunk FILE
//	    HTTP/1.1 server: a POST whose body has "stream": true gets an SSE stream of
//	    X-Bench-Chunks copies of the chunk (default 20), the first at once and the others
//	    X-Bench-Interval-Ms apart (default 0: back to back, one write each), then
//	    "data: [DONE]"; any other request gets the response file as application/json.
//	sink      -listen ADDR [-tls]
//	    TCP (or TLS, self-signed ECDSA P-256) server: reads each connection to its end, then
//	    writes the byte count in decimal and closes.
//	connect   -proxy ADDR -target HOST:PORT -c N -d DURATION [-tls]
//	    CONNECT setups (then a TLS handshake through the tunnel with -tls), each on a new
//	    connection, closed at once; without -proxy, straight to the target.
//	tunnel    -proxy ADDR -target HOST:PORT -d DURATION
//	    one CONNECT tunnel, bulk bytes to a sink for DURATION; MB/s the sink counted (or, if
//	    the tunnel does not pass the half-close on, MB/s sent: "counted": false).
//	streams   -addr ADDR -path PATH -body FILE -c N -d DURATION -chunks K -interval-ms I
//	    N keep-alive connections each reading SSE streams to the end, back to back.
//	held      -addr ADDR -path PATH -body FILE -n N
//	    opens N streams (each waits for its first chunk), prints a JSON line, holds them until
//	    a line on stdin (or -hold passes), closes them and exits.
//	chunks    -addr ADDR -path PATH -body FILE -n N -interval-ms I -window DURATION
//	    opens N paced streams, then counts the SSE events delivered during the window and the
//	    gaps between consecutive events of a stream, and how late each arrived (the upstream
//	    writes its send time into each chunk's id); prints {"event": "window"} when the window
//	    opens and {"event": "window-end"} when it closes, before the summary.
//
// Load generators print one JSON object on stdout.  Every loop is bounded in count and time,
// and servers exit by themselves after -lifetime.
package main

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var done = []byte("data: [DONE]\n\n")

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadtool upstream|sink|connect|tunnel|streams|held|chunks [flags]")
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "upstream":
		upstream(args)
	case "sink":
		sink(args)
	case "connect":
		connectLoad(args)
	case "tunnel":
		tunnel(args)
	case "streams":
		streams(args)
	case "held":
		held(args)
	case "chunks":
		chunks(args)
	default:
		fmt.Fprintln(os.Stderr, "unknown subcommand", os.Args[1])
		os.Exit(2)
	}
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadtool:", err)
		os.Exit(1)
	}
}

func emit(v any) {
	out, err := json.Marshal(v)
	must(err)
	fmt.Println(string(out))
}

// exitAfter bounds a server's life even if the bench that started it is gone.
func exitAfter(d time.Duration) {
	time.AfterFunc(d, func() { os.Exit(0) })
}

// -- servers ---------------------------------------------------------------------------------

func upstream(args []string) {
	fs := flag.NewFlagSet("upstream", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address")
	responseFile := fs.String("response", "", "the non-streaming answer")
	chunkFile := fs.String("chunk", "", "one SSE event")
	lifetime := fs.Duration("lifetime", time.Hour, "exit after")
	must(fs.Parse(args))
	response, err := os.ReadFile(*responseFile)
	must(err)
	chunk, err := os.ReadFile(*chunkFile)
	must(err)
	exitAfter(*lifetime)
	ln, err := net.Listen("tcp", *listen)
	must(err)
	handler := func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		if !bytes.Contains(body, []byte(`"stream":true`)) && !bytes.Contains(body, []byte(`"stream": true`)) {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Length", strconv.Itoa(len(response)))
			_, _ = w.Write(response)
			return
		}
		count := headerInt(r, "X-Bench-Chunks", 20)
		interval := time.Duration(headerInt(r, "X-Bench-Interval-Ms", 0)) * time.Millisecond
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.WriteHeader(http.StatusOK)
		flusher := w.(http.Flusher)
		event := append([]byte(nil), chunk...)
		stamp := bytes.Index(event, stampMarker) // the send time goes here, for chunks' lateness
		start := time.Now()
		var timer *time.Timer
		for i := 0; i < count; i++ {
			if i > 0 && interval > 0 {
				// On a fixed schedule, so a late chunk does not delay the ones after it.
				wait := time.Until(start.Add(time.Duration(i) * interval))
				if timer == nil {
					timer = time.NewTimer(wait)
				} else {
					timer.Reset(wait)
				}
				select {
				case <-timer.C:
				case <-r.Context().Done():
					timer.Stop()
					return
				}
			}
			if stamp >= 0 {
				putStamp(event[stamp+len(stampMarker)-stampDigits:], time.Now())
			}
			if _, err := w.Write(event); err != nil {
				return
			}
			flusher.Flush()
		}
		_, _ = w.Write(done)
	}
	srv := &http.Server{Handler: http.HandlerFunc(handler), ReadHeaderTimeout: 30 * time.Second}
	must(srv.Serve(ln))
}

// stampMarker is where the chunk carries its send time: its id ends with 16 digits,
// microseconds since 1970, in place of the marker's zeros.
var stampMarker = []byte("bench0000000000000000")

const stampDigits = 16

func putStamp(dst []byte, t time.Time) {
	v := t.UnixMicro()
	for i := stampDigits - 1; i >= 0; i-- {
		dst[i] = byte('0' + v%10)
		v /= 10
	}
}

// readStamp is the send time in an event with a stamp (false if it has none).
func readStamp(event []byte) (int64, bool) {
	i := bytes.Index(event, stampMarker[:len(stampMarker)-stampDigits])
	if i < 0 || len(event) < i+len(stampMarker) {
		return 0, false
	}
	v, err := strconv.ParseInt(string(event[i+len(stampMarker)-stampDigits:i+len(stampMarker)]), 10, 64)
	return v, err == nil && v > 0
}

func headerInt(r *http.Request, name string, fallback int) int {
	if v, err := strconv.Atoi(r.Header.Get(name)); err == nil && v >= 0 {
		return v
	}
	return fallback
}

func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	template := x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	must(err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// sinkBuffers: the sink's read buffers, reused (a new 256 KiB buffer per connection costs the
// load core more than the rest of a CONNECT setup: zeroing it, and the collections it brings).
var sinkBuffers = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

func sink(args []string) {
	fs := flag.NewFlagSet("sink", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address")
	useTLS := fs.Bool("tls", false, "TLS (self-signed ECDSA P-256)")
	lifetime := fs.Duration("lifetime", time.Hour, "exit after")
	must(fs.Parse(args))
	exitAfter(*lifetime)
	ln, err := net.Listen("tcp", *listen)
	must(err)
	if *useTLS {
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{selfSigned()}})
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			time.Sleep(10 * time.Millisecond) // e.g. out of descriptors: back off, don't spin
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Minute))
			buf := sinkBuffers.Get().(*[]byte)
			defer sinkBuffers.Put(buf)
			var total int64
			for {
				n, err := c.Read(*buf)
				total += int64(n)
				if err != nil {
					break
				}
			}
			_, _ = c.Write(strconv.AppendInt((*buf)[:0], total, 10))
		}(conn)
	}
}

// -- helpers for the load generators ----------------------------------------------------------

type errorCounts struct {
	mu sync.Mutex
	m  map[string]int
}

func (e *errorCounts) add(what string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.m == nil {
		e.m = map[string]int{}
	}
	// Keep the kinds few: drop addresses and ports from the message.
	if i := strings.LastIndex(what, ": "); i >= 0 {
		what = what[i+2:]
	}
	e.m[what]++
}

func (e *errorCounts) get() map[string]int {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[string]int{}
	for k, v := range e.m {
		out[k] = v
	}
	return out
}

// percentiles of durations, in milliseconds.
func percentiles(values []time.Duration) map[string]float64 {
	out := map[string]float64{}
	if len(values) == 0 {
		return out
	}
	sort.Slice(values, func(i, j int) bool { return values[i] < values[j] })
	for _, p := range []int{50, 90, 99} {
		i := len(values) * p / 100
		if i >= len(values) {
			i = len(values) - 1
		}
		out[fmt.Sprintf("p%d_ms", p)] = float64(values[i]) / 1e6
	}
	out["max_ms"] = float64(values[len(values)-1]) / 1e6
	return out
}

// readHead reads a response head (status line and headers) and returns the status code.
func readHead(r *bufio.Reader) (int, error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(string(line))
	if len(fields) < 2 {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(fields[1])
	if err != nil {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	for {
		line, err = r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if len(bytes.TrimRight(line, "\r\n")) == 0 {
			return status, nil
		}
	}
}

func proxyConnect(conn net.Conn, target string) error {
	return connectVia(conn, connectRequest(target), bufio.NewReaderSize(conn, 1024))
}

// connectRequest is the CONNECT head sent for target.
func connectRequest(target string) []byte {
	return []byte("CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n")
}

// connectVia sends a CONNECT head (request) on conn and reads its answer with r (reading
// conn): nil for a 200 with nothing behind it.
func connectVia(conn net.Conn, request []byte, r *bufio.Reader) error {
	if _, err := conn.Write(request); err != nil {
		return err
	}
	status, err := readHead(r)
	if err != nil {
		return err
	}
	if status != 200 {
		return fmt.Errorf("status %d", status)
	}
	if r.Buffered() > 0 {
		return errors.New("bytes after the CONNECT answer")
	}
	return nil
}

// -- CONNECT ---------------------------------------------------------------------------------

func connectLoad(args []string) {
	fs := flag.NewFlagSet("connect", flag.ExitOnError)
	proxy := fs.String("proxy", "", "proxy address (none: straight to the target)")
	target := fs.String("target", "", "host:port")
	concurrency := fs.Int("c", 64, "connections at once")
	duration := fs.Duration("d", 10*time.Second, "how long")
	useTLS := fs.Bool("tls", false, "a TLS handshake through the tunnel")
	must(fs.Parse(args))
	dial := *target
	if *proxy != "" {
		dial = *proxy
	}
	tlsConfig := &tls.Config{InsecureSkipVerify: true, ServerName: "localhost"} // loopback, self-signed
	request := connectRequest(*target)
	dialer := net.Dialer{Timeout: 5 * time.Second}
	var ok int64
	var errs errorCounts
	latencies := make([][]time.Duration, *concurrency)
	start := time.Now()
	deadline := start.Add(*duration)
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			// One reader per worker, reset onto each new connection.
			r := bufio.NewReaderSize(nil, 1024)
			for time.Now().Before(deadline) {
				t := time.Now()
				err := func() error {
					conn, err := dialer.Dial("tcp", dial)
					if err != nil {
						return err
					}
					defer conn.Close()
					_ = conn.SetDeadline(t.Add(10 * time.Second))
					if *proxy != "" {
						r.Reset(conn)
						if err := connectVia(conn, request, r); err != nil {
							return err
						}
					}
					if *useTLS {
						return tls.Client(conn, tlsConfig).Handshake()
					}
					return nil
				}()
				if err != nil {
					errs.add(err.Error())
					continue
				}
				atomic.AddInt64(&ok, 1)
				latencies[w] = append(latencies[w], time.Since(t))
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range latencies {
		all = append(all, l...)
	}
	emit(map[string]any{"ok": ok, "rate": float64(ok) / elapsed, "elapsed": elapsed, "errors": errs.get(),
		"latency": percentiles(all)})
}

func tunnel(args []string) {
	fs := flag.NewFlagSet("tunnel", flag.ExitOnError)
	proxy := fs.String("proxy", "", "proxy address (none: straight to the target)")
	target := fs.String("target", "", "host:port of a sink")
	duration := fs.Duration("d", 5*time.Second, "how long to send")
	must(fs.Parse(args))
	dial := *target
	if *proxy != "" {
		dial = *proxy
	}
	conn, err := net.DialTimeout("tcp", dial, 5*time.Second)
	must(err)
	_ = conn.SetDeadline(time.Now().Add(*duration + 60*time.Second))
	if *proxy != "" {
		must(proxyConnect(conn, *target))
	}
	buf := make([]byte, 256<<10)
	var sent int64
	start := time.Now()
	for time.Since(start) < *duration {
		n, err := conn.Write(buf)
		sent += int64(n)
		if err != nil {
			must(err)
		}
	}
	sendTime := time.Since(start).Seconds()
	must(conn.(*net.TCPConn).CloseWrite())
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	reply, err := io.ReadAll(conn)
	elapsed := time.Since(start).Seconds()
	counted, perr := strconv.ParseInt(string(reply), 10, 64)
	if err != nil || perr != nil {
		// The tunnel did not pass the half-close on (or cut the answer): what was sent is
		// within the sockets' buffers of what arrived.
		emit(map[string]any{"sent": sent, "elapsed": elapsed, "counted": false,
			"mb_per_s": float64(sent) / sendTime / 1e6})
		return
	}
	emit(map[string]any{"sent": sent, "received": counted, "elapsed": elapsed, "counted": true,
		"mb_per_s": float64(counted) / elapsed / 1e6})
}

// -- streams ---------------------------------------------------------------------------------

type streamTarget struct {
	addr, path string
	body       []byte
}

func streamFlags(fs *flag.FlagSet) func() streamTarget {
	addr := fs.String("addr", "", "host:port")
	path := fs.String("path", "/v1/chat/completions", "request path")
	bodyFile := fs.String("body", "", "request body (a streaming chat completion)")
	return func() streamTarget {
		body, err := os.ReadFile(*bodyFile)
		must(err)
		return streamTarget{*addr, *path, body}
	}
}

func (t streamTarget) request(chunks, intervalMs int) []byte {
	return []byte(fmt.Sprintf("POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer bench-key\r\n"+
		"Content-Type: application/json\r\nX-Bench-Chunks: %d\r\nX-Bench-Interval-Ms: %d\r\n"+
		"Content-Length: %d\r\n\r\n%s", t.path, chunks, intervalMs, len(t.body), t.body))
}

// open sends a streaming request on a new connection and waits for the first body bytes.
func (t streamTarget) open(chunks, intervalMs int, timeout time.Duration) (net.Conn, io.Reader, error) {
	conn, err := net.DialTimeout("tcp", t.addr, timeout)
	if err != nil {
		return nil, nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(t.request(chunks, intervalMs)); err != nil {
		conn.Close()
		return nil, nil, err
	}
	r := bufio.NewReaderSize(conn, 16<<10)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if resp.StatusCode != 200 {
		conn.Close()
		return nil, nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	if _, err := r.Peek(1); err != nil {
		conn.Close()
		return nil, nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, resp.Body, nil
}

func streams(args []string) {
	fs := flag.NewFlagSet("streams", flag.ExitOnError)
	target := streamFlags(fs)
	concurrency := fs.Int("c", 200, "streams at once")
	duration := fs.Duration("d", 10*time.Second, "start streams for this long")
	count := fs.Int("chunks", 20, "chunks per stream")
	interval := fs.Int("interval-ms", 0, "between chunks")
	must(fs.Parse(args))
	t := target()
	request := t.request(*count, *interval)
	var ok int64
	var errs errorCounts
	ttfc := make([][]time.Duration, *concurrency)
	start := time.Now()
	deadline := start.Add(*duration)
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var conn net.Conn
			var r *bufio.Reader
			defer func() {
				if conn != nil {
					conn.Close()
				}
			}()
			buf := make([]byte, 32<<10)
			for time.Now().Before(deadline) {
				err := func() error {
					if conn == nil {
						c, err := net.DialTimeout("tcp", t.addr, 5*time.Second)
						if err != nil {
							return err
						}
						conn, r = c, bufio.NewReaderSize(c, 32<<10)
					}
					_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
					sent := time.Now()
					if _, err := conn.Write(request); err != nil {
						return err
					}
					resp, err := http.ReadResponse(r, nil)
					if err != nil {
						return err
					}
					first := true
					var tail []byte
					for {
						n, err := resp.Body.Read(buf)
						if n > 0 {
							if first {
								ttfc[w] = append(ttfc[w], time.Since(sent))
								first = false
							}
							tail = append(tail, buf[:n]...)
							if len(tail) > len(done) {
								tail = tail[len(tail)-len(done):]
							}
						}
						if err == io.EOF {
							break
						}
						if err != nil {
							return err
						}
					}
					if resp.StatusCode != 200 {
						return fmt.Errorf("status %d", resp.StatusCode)
					}
					if !bytes.Equal(tail, done) {
						return errors.New("stream without [DONE]")
					}
					if resp.Close {
						conn.Close()
						conn = nil
					}
					return nil
				}()
				if err != nil {
					errs.add(err.Error())
					if conn != nil {
						conn.Close()
						conn = nil
					}
					continue
				}
				atomic.AddInt64(&ok, 1)
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range ttfc {
		all = append(all, l...)
	}
	emit(map[string]any{"ok": ok, "rate": float64(ok) / elapsed, "elapsed": elapsed, "errors": errs.get(),
		"first_chunk": percentiles(all)})
}

// openMany opens up to n streams, at most rampC being opened at once, until rampTimeout.
func openMany(t streamTarget, n, rampC int, rampTimeout time.Duration, chunks, intervalMs int,
	errs *errorCounts, opened func(net.Conn, io.Reader)) {
	sem := make(chan struct{}, rampC)
	deadline := time.Now().Add(rampTimeout)
	var wg sync.WaitGroup
	for i := 0; i < n && time.Now().Before(deadline); i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			conn, body, err := t.open(chunks, intervalMs, 30*time.Second)
			if err != nil {
				errs.add(err.Error())
				return
			}
			opened(conn, body)
		}()
	}
	wg.Wait()
}

func held(args []string) {
	fs := flag.NewFlagSet("held", flag.ExitOnError)
	target := streamFlags(fs)
	n := fs.Int("n", 10000, "streams to open")
	rampC := fs.Int("ramp-c", 64, "streams being opened at once")
	rampTimeout := fs.Duration("ramp-timeout", 120*time.Second, "stop opening after")
	hold := fs.Duration("hold", 120*time.Second, "close at the latest after")
	must(fs.Parse(args))
	t := target()
	var mu sync.Mutex
	var conns []net.Conn
	var errs errorCounts
	start := time.Now()
	// One chunk every 30 s: the streams stay open and nearly silent.
	openMany(t, *n, *rampC, *rampTimeout, 1000, 30000, &errs, func(c net.Conn, _ io.Reader) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	})
	emit(map[string]any{"open": len(conns), "tried": *n, "ramp_s": time.Since(start).Seconds(), "errors": errs.get()})
	lines := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		close(lines)
	}()
	select {
	case <-lines:
	case <-time.After(*hold):
	}
	for _, c := range conns {
		c.Close()
	}
}

func chunks(args []string) {
	fs := flag.NewFlagSet("chunks", flag.ExitOnError)
	target := streamFlags(fs)
	n := fs.Int("n", 2000, "streams")
	interval := fs.Int("interval-ms", 50, "between chunks")
	window := fs.Duration("window", 10*time.Second, "count chunks for this long once all are open")
	rampC := fs.Int("ramp-c", 64, "streams being opened at once")
	rampTimeout := fs.Duration("ramp-timeout", 60*time.Second, "stop opening after")
	settle := fs.Duration("settle", 3*time.Second, "wait between the ramp and the window")
	must(fs.Parse(args))
	t := target()
	// Enough chunks to outlast the ramp, the settling and the window.
	count := int(((*rampTimeout + *settle + *window).Milliseconds() + 10000) / int64(*interval))
	var measuring int32
	var delivered int64
	var mu sync.Mutex
	var conns []net.Conn
	var gaps, lates [][]time.Duration
	var errs errorCounts
	var readers sync.WaitGroup
	start := time.Now()
	openMany(t, *n, *rampC, *rampTimeout, count, *interval, &errs, func(c net.Conn, body io.Reader) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
		readers.Add(1)
		go func() {
			defer readers.Done()
			var myGaps, myLates []time.Duration
			defer func() {
				mu.Lock()
				gaps = append(gaps, myGaps)
				lates = append(lates, myLates)
				mu.Unlock()
			}()
			buf := make([]byte, 16<<10)
			var event []byte
			var last time.Time
			newline := false // the previous byte was '\n'
			for {
				nr, err := body.Read(buf)
				if nr > 0 {
					now := time.Now()
					on := atomic.LoadInt32(&measuring) == 1
					from := 0
					for i, b := range buf[:nr] {
						if b != '\n' || !newline {
							newline = b == '\n'
							continue
						}
						// "\n\n": the end of an SSE event
						newline = false
						event = append(event, buf[from:i+1]...)
						from = i + 1
						if on {
							atomic.AddInt64(&delivered, 1)
							if !last.IsZero() {
								myGaps = append(myGaps, now.Sub(last))
							}
							last = now
							if sent, ok := readStamp(event); ok {
								myLates = append(myLates, time.Duration(now.UnixMicro()-sent)*time.Microsecond)
							}
						}
						event = event[:0]
					}
					event = append(event, buf[from:nr]...)
					if !on {
						last = time.Time{}
					}
				}
				if err != nil {
					return
				}
			}
		}()
	})
	ramp := time.Since(start).Seconds()
	time.Sleep(*settle) // chunks held up during the ramp reach the client before the window
	atomic.StoreInt32(&measuring, 1)
	t0 := time.Now()
	emit(map[string]any{"event": "window"})
	time.Sleep(*window)
	atomic.StoreInt32(&measuring, 0)
	elapsed := time.Since(t0).Seconds()
	emit(map[string]any{"event": "window-end"})
	got := atomic.LoadInt64(&delivered)
	mu.Lock()
	open := len(conns)
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	finished := make(chan struct{})
	go func() { readers.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
	}
	mu.Lock()
	var allGaps, allLates []time.Duration
	for i := range gaps {
		allGaps = append(allGaps, gaps[i]...)
		allLates = append(allLates, lates[i]...)
	}
	mu.Unlock()
	emit(map[string]any{"open": open, "tried": *n, "ramp_s": ramp, "delivered": got,
		"rate": float64(got) / elapsed, "offered": float64(open) * 1000 / float64(*interval),
		"nominal": float64(*n) * 1000 / float64(*interval), "gap": percentiles(allGaps), "late": percentiles(allLates), "errors": errs.get()})
}
