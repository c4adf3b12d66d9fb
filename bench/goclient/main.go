// Command goclient times Snapshots API calls against one snapshotter socket with containerd's own
// Go client (snapshots/proxy over api/services/snapshots/v1), for bench/perfbench.py.
//
// Bench mode (default): runs the ops given by -ops (name:iterations, in that order) at each
// concurrency of -c (1,8: one goroutine, then 8, each goroutine on its own gRPC connection) and
// prints one JSON array: per op and concurrency the timed calls, wall seconds, ops/s, p50/p99
// latency and the server's CPU seconds over the timed phase. That CPU time is the sum over the
// server's threads of their run time in /proc/PID/task/TID/schedstat (ns) or, if a thread exited
// meanwhile (its time would be lost), utime+stime of /proc/PID/stat (clock ticks, 10 ms); both are
// in the output. Fixtures and warm-up calls (a tenth of the iterations per goroutine, 1 to 50) run
// before the timed phase and outside the CPU window. The list ops fill the store to exactly 100 or
// 1000 snapshots with committed ones and check the count on every call: run them first, before
// the other ops add theirs.
//
// Populate mode (-populate N): creates N active snapshots (one Prepare each, no parent) labelled
// containerd.io/gc.root (so containerd's garbage collector keeps them), with -c goroutines, and
// prints {"created", "seconds"}.
//
// Fill mode (-fill N): creates N committed snapshots (Prepare then Commit each, no parent), keys
// from -prefix, with -c goroutines, and prints {"created", "seconds"}; for bench/scalebench.py.
//
// Phase mode (-phase prepare|mounts|remove|walk -n N), for bench/scalebench.py: one connection,
// N calls one after the other, every call timed: Prepare of <prefix>-F ... <prefix>-(F+N-1) on
// -parent with the -label key=value labels (repeatable), Mounts or Remove of those keys, or N
// Walks of the whole store (each must count -expect-count snapshots, unless -1); F is -first. With
// -expect-lowers K, every overlay mount returned must name exactly K lowerdirs. Prints one JSON
// object: the calls, wall seconds, ops/s, every call's latency in order (latencies_us) and the
// server's CPU time over the phase (as in bench mode). No warm-up: the first calls are the data.
//
// With -namespace the calls carry containerd's namespace header: -address may then be containerd's
// own socket, -snapshotter naming the snapshotter behind it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
)

const (
	mountsParents  = 3
	chainLayers    = 10
	filesPerLayer  = 50
	gcRootLabel    = "containerd.io/gc.root"
	maxWarmup      = 50
	warmupFraction = 10
)

type options struct {
	address, snapshotter, namespace, prefix, workdir, ops, conc string
	pid, clkTck, populate                                       int
	fill, n, first, expectLowers, expectCount                   int
	phase, parent                                               string
	labels                                                      labelFlag
}

// labelFlag collects repeated -label key=value flags.
type labelFlag map[string]string

func (l *labelFlag) String() string { return fmt.Sprint(map[string]string(*l)) }

func (l *labelFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want key=value, got %q", s)
	}
	if *l == nil {
		*l = labelFlag{}
	}
	(*l)[k] = v
	return nil
}

// phaseResult is the output of phase mode.
type phaseResult struct {
	Phase       string    `json:"phase"`
	N           int       `json:"n"`
	Seconds     float64   `json:"seconds"`
	OpsPerS     float64   `json:"ops_per_s"`
	LatenciesUs []float64 `json:"latencies_us"`
	ServerCPUS  float64   `json:"server_cpu_s"`
	CPUSource   string    `json:"server_cpu_source"`
}

// bench holds one snapshotter client per connection; goroutine w of a phase uses sns[w].
type bench struct {
	opt options
	ctx context.Context
	sns []snapshots.Snapshotter
}

// result is one line of the output, for one op at one concurrency.
type result struct {
	Op          string  `json:"op"`
	Concurrency int     `json:"concurrency"`
	N           int     `json:"n"`
	Seconds     float64 `json:"seconds"`
	OpsPerS     float64 `json:"ops_per_s"`
	P50Us       float64 `json:"p50_us"`
	P99Us       float64 `json:"p99_us"`
	ServerCPUS  float64 `json:"server_cpu_s"`
	CPUSource   string  `json:"server_cpu_source"` // schedstat or stat
	StatCPUS    float64 `json:"server_cpu_s_stat"`
	CPUUsPerOp  float64 `json:"server_cpu_us_per_op"`
}

// cpuSample is a server's CPU time at one instant: utime+stime in seconds, and the run time in ns
// of each live thread.
type cpuSample struct {
	stat    float64
	threads map[string]uint64
}

// step is one timed iteration i of goroutine w.
type step func(w, i int) error

// op makes its fixtures for `workers` goroutines doing `total` iterations each (warm-up included)
// and returns the step to time.
type op func(b *bench, workers, total int) (step, error)

var ops = map[string]op{
	"list-100":       listOp(100),
	"list-1000":      listOp(1000),
	"stat":           statOp,
	"mounts":         mountsOp,
	"prepare-remove": prepareRemoveOp,
	"commit":         commitOp,
	"chain":          chainOp,
}

func main() {
	var o options
	flag.StringVar(&o.address, "address", "", "unix socket of the Snapshots service")
	flag.StringVar(&o.snapshotter, "snapshotter", "overlay-custom-add-lower-snapshotter", "snapshotter name sent in requests")
	flag.StringVar(&o.namespace, "namespace", "", "containerd namespace header (for containerd's socket)")
	flag.StringVar(&o.prefix, "prefix", "gc", "prefix of every key this run creates")
	flag.StringVar(&o.workdir, "workdir", "", "dir for the chain op's mount points")
	flag.StringVar(&o.ops, "ops", "stat:1000", "comma-separated op:iterations, run in this order")
	flag.StringVar(&o.conc, "c", "1,8", "comma-separated concurrencies, each op runs at each")
	flag.IntVar(&o.pid, "pid", 0, "server pid whose CPU time is read (0: none)")
	flag.IntVar(&o.clkTck, "clk-tck", 100, "clock ticks per second of /proc/PID/stat")
	flag.IntVar(&o.populate, "populate", 0, "populate mode: create this many active gc.root snapshots")
	flag.IntVar(&o.fill, "fill", 0, "fill mode: create this many committed snapshots")
	flag.StringVar(&o.phase, "phase", "", "phase mode: prepare, mounts, remove or walk, -n calls in a row")
	flag.IntVar(&o.n, "n", 1000, "phase mode: calls")
	flag.IntVar(&o.first, "first", 0, "phase mode: the first call's key index (keys <prefix>-first ...)")
	flag.StringVar(&o.parent, "parent", "", "phase mode: the parent of each Prepare")
	flag.Var(&o.labels, "label", "phase mode: a key=value label of each Prepare (repeatable)")
	flag.IntVar(&o.expectLowers, "expect-lowers", 0, "phase mode: lowerdirs each overlay mount must name (0: no check)")
	flag.IntVar(&o.expectCount, "expect-count", -1, "phase mode: snapshots each walk must count (-1: no check)")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "goclient:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	concs, err := intList(o.conc)
	if err != nil {
		return err
	}
	maxConc := 1
	for _, c := range concs {
		if c > maxConc {
			maxConc = c
		}
	}
	b := &bench{opt: o, ctx: context.Background()}
	if o.namespace != "" {
		b.ctx = namespaces.WithNamespace(b.ctx, o.namespace)
	}
	for i := 0; i < maxConc; i++ {
		conn, err := dial(o.address)
		if err != nil {
			return err
		}
		defer conn.Close()
		b.sns = append(b.sns, proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), o.snapshotter))
	}
	out := json.NewEncoder(os.Stdout)
	if o.phase != "" {
		r, err := b.runPhase()
		if err != nil {
			return err
		}
		return out.Encode(r)
	}
	if o.fill > 0 {
		start := time.Now()
		if err := b.fill(o.fill, maxConc, "fill"); err != nil {
			return err
		}
		return out.Encode(map[string]interface{}{"created": o.fill, "seconds": time.Since(start).Seconds()})
	}
	if o.populate > 0 {
		start := time.Now()
		if err := b.populate(o.populate, maxConc); err != nil {
			return err
		}
		return out.Encode(map[string]interface{}{"created": o.populate, "seconds": time.Since(start).Seconds()})
	}
	var results []result
	for _, spec := range strings.Split(o.ops, ",") {
		name, count, ok := strings.Cut(spec, ":")
		n, err := strconv.Atoi(count)
		if !ok || err != nil || ops[name] == nil {
			return fmt.Errorf("bad op %q (known: list-100 list-1000 stat mounts prepare-remove commit chain)", spec)
		}
		for _, c := range concs {
			r, err := b.measure(name, ops[name], n, c)
			if err != nil {
				return fmt.Errorf("%s at -c %d: %w", name, c, err)
			}
			results = append(results, r)
		}
	}
	return out.Encode(results)
}

func dial(path string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", addr)
	}
	return grpc.DialContext(ctx, path, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer))
}

// measure runs `o` with c goroutines, ceil(n/c) timed iterations each after the warm-up.
func (b *bench) measure(name string, o op, n, c int) (result, error) {
	per := (n + c - 1) / c
	warm := per / warmupFraction
	if warm < 1 {
		warm = 1
	}
	if warm > maxWarmup {
		warm = maxWarmup
	}
	s, err := o(b, c, warm+per)
	if err != nil {
		return result{}, err
	}
	lat := make([][]time.Duration, c)
	errs := make([]error, c)
	var ready, done sync.WaitGroup
	begin := make(chan struct{})
	ready.Add(c)
	done.Add(c)
	for w := 0; w < c; w++ {
		go func(w int) {
			defer done.Done()
			for i := 0; i < warm && errs[w] == nil; i++ {
				errs[w] = s(w, i)
			}
			ready.Done()
			<-begin
			for i := warm; i < warm+per && errs[w] == nil; i++ {
				t := time.Now()
				errs[w] = s(w, i)
				lat[w] = append(lat[w], time.Since(t))
			}
		}(w)
	}
	ready.Wait()
	cpu0, err := b.sampleCPU()
	if err != nil {
		return result{}, err
	}
	start := time.Now()
	close(begin)
	done.Wait()
	wall := time.Since(start)
	cpu1, err := b.sampleCPU()
	if err != nil {
		return result{}, err
	}
	var all []time.Duration
	for w := 0; w < c; w++ {
		if errs[w] != nil {
			return result{}, errs[w]
		}
		all = append(all, lat[w]...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	cpu, source := cpuBetween(cpu0, cpu1)
	return result{
		Op: name, Concurrency: c, N: len(all), Seconds: wall.Seconds(),
		OpsPerS: float64(len(all)) / wall.Seconds(),
		P50Us:   percentile(all, 50), P99Us: percentile(all, 99),
		ServerCPUS: cpu, CPUSource: source, StatCPUS: cpu1.stat - cpu0.stat,
		CPUUsPerOp: cpu / float64(len(all)) * 1e6,
	}, nil
}

// percentile is the nearest-rank percentile of sorted durations, in microseconds.
func percentile(sorted []time.Duration, p float64) float64 {
	rank := int(float64(len(sorted))*p/100+0.999999) - 1
	if rank < 0 {
		rank = 0
	}
	return float64(sorted[rank].Nanoseconds()) / 1e3
}

// sampleCPU reads the server's CPU time (zero without -pid).
func (b *bench) sampleCPU() (cpuSample, error) {
	s := cpuSample{threads: map[string]uint64{}}
	if b.opt.pid == 0 {
		return s, nil
	}
	proc := fmt.Sprintf("/proc/%d", b.opt.pid)
	data, err := os.ReadFile(proc + "/stat")
	if err != nil {
		return s, err
	}
	// Fields after the command name (which may hold spaces) start at field 3, state.
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	utime, err1 := strconv.ParseFloat(fields[11], 64)
	stime, err2 := strconv.ParseFloat(fields[12], 64)
	if err1 != nil || err2 != nil {
		return s, fmt.Errorf("cannot parse %s/stat", proc)
	}
	s.stat = (utime + stime) / float64(b.opt.clkTck)
	tasks, err := os.ReadDir(proc + "/task")
	if err != nil {
		return s, err
	}
	for _, t := range tasks {
		data, err := os.ReadFile(proc + "/task/" + t.Name() + "/schedstat")
		if err != nil { // the thread exited meanwhile
			continue
		}
		if f := strings.Fields(string(data)); len(f) > 0 {
			if ns, err := strconv.ParseUint(f[0], 10, 64); err == nil {
				s.threads[t.Name()] = ns
			}
		}
	}
	return s, nil
}

// cpuBetween is the CPU time from a to z: from the threads' run times unless a thread of a is gone
// in z, else (coarser, but with exited threads) from utime+stime. It says which.
func cpuBetween(a, z cpuSample) (float64, string) {
	var ns uint64
	for tid, before := range a.threads {
		after, ok := z.threads[tid]
		if !ok {
			return z.stat - a.stat, "stat"
		}
		ns += after - before
	}
	for tid, after := range z.threads {
		if _, ok := a.threads[tid]; !ok {
			ns += after
		}
	}
	return float64(ns) / 1e9, "schedstat"
}

func (b *bench) key(parts ...interface{}) string {
	s := b.opt.prefix
	for _, p := range parts {
		s += fmt.Sprintf("-%v", p)
	}
	return s
}

// committed prepares `name`-active on parent and commits it as `name`.
func (b *bench) committed(sn snapshots.Snapshotter, name, parent string) error {
	if _, err := sn.Prepare(b.ctx, name+"-active", parent); err != nil {
		return err
	}
	return sn.Commit(b.ctx, name, name+"-active")
}

// fill creates `count` committed snapshots named after `tag` with `workers` goroutines.
func (b *bench) fill(count, workers int, tag string) error {
	return b.parallel(count, workers, func(sn snapshots.Snapshotter, i int) error {
		return b.committed(sn, b.key(tag, i), "")
	})
}

// parallel calls f for i in [0, count) from `workers` goroutines, goroutine w on connection w.
func (b *bench) parallel(count, workers int, f func(sn snapshots.Snapshotter, i int) error) error {
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < count && errs[w] == nil; i += workers {
				errs[w] = f(b.sns[w], i)
			}
		}(w)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// populate prepares `count` active snapshots labelled gc.root with `workers` goroutines.
func (b *bench) populate(count, workers int) error {
	label := snapshots.WithLabels(map[string]string{gcRootLabel: "perfbench"})
	return b.parallel(count, workers, func(sn snapshots.Snapshotter, i int) error {
		_, err := sn.Prepare(b.ctx, b.key("pop", i), "", label)
		return err
	})
}

func (b *bench) count(sn snapshots.Snapshotter) (int, error) {
	n := 0
	err := sn.Walk(b.ctx, func(context.Context, snapshots.Info) error { n++; return nil })
	return n, err
}

func listOp(size int) op {
	return func(b *bench, workers, total int) (step, error) {
		stored, err := b.count(b.sns[0])
		// The Go original answers a List on a store never written to with UNKNOWN "bucket does not exist".
		if err != nil && strings.Contains(err.Error(), "bucket does not exist") {
			stored, err = 0, nil
		}
		if err != nil {
			return nil, err
		}
		if stored > size {
			return nil, fmt.Errorf("the store holds %d snapshots, more than %d (list ops must run first)", stored, size)
		}
		if err := b.fill(size-stored, len(b.sns), fmt.Sprintf("list%d", stored)); err != nil {
			return nil, err
		}
		return func(w, i int) error {
			n, err := b.count(b.sns[w])
			if err == nil && n != size {
				err = fmt.Errorf("list returned %d snapshots, expected %d", n, size)
			}
			return err
		}, nil
	}
}

func statOp(b *bench, workers, total int) (step, error) {
	name := b.key("stat", workers)
	if err := b.committed(b.sns[0], name, ""); err != nil {
		return nil, err
	}
	return func(w, i int) error { _, err := b.sns[w].Stat(b.ctx, name); return err }, nil
}

func mountsOp(b *bench, workers, total int) (step, error) {
	parent := ""
	for p := 0; p < mountsParents; p++ {
		name := b.key("mounts", workers, "p", p)
		if err := b.committed(b.sns[0], name, parent); err != nil {
			return nil, err
		}
		parent = name
	}
	active := b.key("mounts", workers, "active")
	if _, err := b.sns[0].Prepare(b.ctx, active, parent); err != nil {
		return nil, err
	}
	return func(w, i int) error { _, err := b.sns[w].Mounts(b.ctx, active); return err }, nil
}

func prepareRemoveOp(b *bench, workers, total int) (step, error) {
	parent := b.key("prm", workers, "parent")
	if err := b.committed(b.sns[0], parent, ""); err != nil {
		return nil, err
	}
	return func(w, i int) error {
		key := b.key("prm", workers, w, i)
		if _, err := b.sns[w].Prepare(b.ctx, key, parent); err != nil {
			return err
		}
		return b.sns[w].Remove(b.ctx, key)
	}, nil
}

// commitOp prepares every active snapshot it will commit before the timed phase.
func commitOp(b *bench, workers, total int) (step, error) {
	for w := 0; w < workers; w++ {
		for i := 0; i < total; i++ {
			if _, err := b.sns[w].Prepare(b.ctx, b.key("commit", workers, w, i, "active"), ""); err != nil {
				return nil, err
			}
		}
	}
	return func(w, i int) error {
		return b.sns[w].Commit(b.ctx, b.key("commit", workers, w, i), b.key("commit", workers, w, i, "active"))
	}, nil
}

// chainOp: one iteration builds a chain of 10 layers, each prepared on the previous one, mounted
// (containerd's mount package, as containerd mounts a rootfs), given 50 small files, unmounted
// and committed.
func chainOp(b *bench, workers, total int) (step, error) {
	if b.opt.workdir == "" {
		return nil, fmt.Errorf("the chain op needs -workdir")
	}
	targets := make([]string, workers)
	for w := range targets {
		targets[w] = filepath.Join(b.opt.workdir, fmt.Sprintf("mnt-c%d-w%d", workers, w))
		if err := os.MkdirAll(targets[w], 0o755); err != nil {
			return nil, err
		}
	}
	return func(w, i int) error {
		sn, target, parent := b.sns[w], targets[w], ""
		for layer := 0; layer < chainLayers; layer++ {
			name := b.key("chain", workers, w, i, layer)
			mounts, err := sn.Prepare(b.ctx, name+"-active", parent)
			if err != nil {
				return err
			}
			if err := mount.All(mounts, target); err != nil {
				return fmt.Errorf("mount %v: %w", mounts, err)
			}
			for f := 0; f < filesPerLayer; f++ {
				data := []byte(fmt.Sprintf("goclient layer %d file %d\n", layer, f))
				if err = os.WriteFile(filepath.Join(target, fmt.Sprintf("l%d-f%d", layer, f)), data, 0o644); err != nil {
					break
				}
			}
			if uerr := mount.UnmountAll(target, 0); err == nil {
				err = uerr
			}
			if err != nil {
				return err
			}
			if err := sn.Commit(b.ctx, name, name+"-active"); err != nil {
				return err
			}
			parent = name
		}
		return nil
	}, nil
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad concurrency %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// runPhase is phase mode: -n calls of one kind in a row on the first connection, each timed.
func (b *bench) runPhase() (phaseResult, error) {
	sn, o := b.sns[0], b.opt
	var call func(i int) error
	check := func(mounts []mount.Mount, err error) error {
		if err != nil || o.expectLowers == 0 {
			return err
		}
		for _, m := range mounts {
			if m.Type != "overlay" {
				continue
			}
			for _, opt := range m.Options {
				if strings.HasPrefix(opt, "lowerdir=") {
					d := strings.TrimPrefix(opt, "lowerdir=")
					if got := len(strings.Split(d, ":")); got != o.expectLowers {
						return fmt.Errorf("%d lowerdirs, expected %d: %s", got, o.expectLowers, opt)
					}
					return nil
				}
			}
		}
		return fmt.Errorf("no overlay mount with a lowerdir in %v", mounts)
	}
	switch o.phase {
	case "prepare":
		opts := []snapshots.Opt{}
		if len(o.labels) > 0 {
			opts = append(opts, snapshots.WithLabels(o.labels))
		}
		call = func(i int) error { return check(sn.Prepare(b.ctx, b.key(i), o.parent, opts...)) }
	case "mounts":
		call = func(i int) error { return check(sn.Mounts(b.ctx, b.key(i))) }
	case "remove":
		call = func(i int) error { return sn.Remove(b.ctx, b.key(i)) }
	case "walk":
		call = func(i int) error {
			n, err := b.count(sn)
			if err == nil && o.expectCount >= 0 && n != o.expectCount {
				err = fmt.Errorf("walk counted %d snapshots, expected %d", n, o.expectCount)
			}
			return err
		}
	default:
		return phaseResult{}, fmt.Errorf("bad -phase %q (prepare, mounts, remove, walk)", o.phase)
	}
	lat := make([]float64, 0, o.n)
	cpu0, err := b.sampleCPU()
	if err != nil {
		return phaseResult{}, err
	}
	start := time.Now()
	for i := 0; i < o.n; i++ {
		t := time.Now()
		if err := call(o.first + i); err != nil {
			return phaseResult{}, fmt.Errorf("%s call %d of %d: %w", o.phase, i+1, o.n, err)
		}
		lat = append(lat, float64(time.Since(t).Nanoseconds())/1e3)
	}
	wall := time.Since(start)
	cpu1, err := b.sampleCPU()
	if err != nil {
		return phaseResult{}, err
	}
	cpu, source := cpuBetween(cpu0, cpu1)
	return phaseResult{
		Phase: o.phase, N: o.n, Seconds: wall.Seconds(), OpsPerS: float64(o.n) / wall.Seconds(),
		LatenciesUs: lat, ServerCPUS: cpu, CPUSource: source,
	}, nil
}
