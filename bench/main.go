// Command bench measures the proxy under load next to plain Caddy and the
// stand-in upstream alone, runs the hot paths' micro-benchmarks, and
// writes the results to BENCHMARKS.md. `make bench` runs it.
//
// Everything runs on loopback: the stand-in upstream and the load
// generator (the vegeta library) in this process, each Caddy target as a
// subprocess of the ./caddy binary. The targets and the workloads are
// tables (targets.go, workloads.go); every workload is measured on every
// target in interleaved rounds (A B C A B C …) so that what disturbs the
// machine disturbs all targets alike, and each figure is the median over
// the rounds.
//
// After the load it measures what each feature of the module costs
// (features.go) and runs the scenarios of a saturated upstream
// (scarce.go), each in its own section of the report.
//
// With -soak it runs the soak test instead (soak.go): the module alone
// under a long mixed load, checked for errors and leaks, written into its
// own section of the same report.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// config is the run's settings, from the command line.
type config struct {
	caddy        string        // the Caddy binary with this module
	baseline     string        // another build of the module, measured beside it; empty: none
	goCmd        string        // the go command, for the micro-benchmarks and pprof
	out          string        // the report's path
	rounds       int           // rounds of every workload on every target
	duration     time.Duration // of one measurement
	warmup       time.Duration // before each measurement, not counted
	conns        int           // concurrent connections of the load workloads
	streams      int           // concurrent streams of the stream workload
	chunkDelay   time.Duration // the upstream's delay between stream events
	profile      time.Duration // CPU profile of the module under load; 0: none
	profiles     string        // directory to keep the CPU profiles in; empty: dropped with the run
	micro        bool          // run the micro-benchmarks
	pin          bool          // each Caddy on a CPU of its own during the load
	only         string        // comma-separated workloads to measure; empty: all
	scarce       bool          // run the scenarios of a saturated upstream after the load (scarce.go)
	scarceOnly   bool          // run only those, rewriting their section of the report
	burst        bool          // run the burst scenario after the load (burst.go)
	burstOnly    bool          // run only that, rewriting its section of the report
	capacity     bool          // measure the capacity model of the Redis store after the load (capacity.go)
	capacityOnly bool          // measure only that, rewriting its section of the report

	features         bool          // measure what each feature costs after the load (features.go)
	featuresOnly     bool          // measure only that, rewriting its section of the report
	featuresDuration time.Duration // of one measurement of a rung

	soak           bool          // run the soak test instead of the benchmark
	soakDuration   time.Duration // of the soak's mixed load
	soakStreams    int           // concurrent streams of the soak
	soakChunkDelay time.Duration // the upstream's delay between stream events in the soak
}

func main() {
	var cfg config
	flag.StringVar(&cfg.caddy, "caddy", "./caddy", "Caddy binary built with this module (make build)")
	flag.StringVar(&cfg.baseline, "baseline", "", "another Caddy binary with the module (an earlier commit's make build), measured as target "+baselineName+" beside this one, so that before and after a change come from one run")
	flag.StringVar(&cfg.goCmd, "go", "go", "go command, for the micro-benchmarks and pprof")
	flag.StringVar(&cfg.out, "out", "BENCHMARKS.md", "report to write")
	flag.IntVar(&cfg.rounds, "rounds", 7, "interleaved rounds of every workload on every target (at least 3)")
	flag.DurationVar(&cfg.duration, "duration", 2500*time.Millisecond, "length of one measurement")
	flag.DurationVar(&cfg.warmup, "warmup", 500*time.Millisecond, "warm-up before each measurement, not counted")
	flag.IntVar(&cfg.conns, "conns", 16, "concurrent connections of the load workloads")
	flag.IntVar(&cfg.streams, "streams", 8, "concurrent streams of the stream workload")
	flag.DurationVar(&cfg.chunkDelay, "chunk-delay", 20*time.Millisecond, "the upstream's delay between stream events")
	flag.DurationVar(&cfg.profile, "profile", 10*time.Second, "CPU profile of the module under the chat workload; 0 for none")
	flag.StringVar(&cfg.profiles, "profiles", "", "directory to keep the CPU profiles of plain Caddy and the module in (caddy.pprof, vigthoria.pprof), to study with go tool pprof -diff_base")
	flag.BoolVar(&cfg.micro, "micro", true, "run the micro-benchmarks of the hot paths")
	flag.StringVar(&cfg.only, "only", "", "measure only these workloads, comma-separated (chat-1, chat, chat-jwt, models, mix, stream), to study one; the goals of the others are then not judged")
	flag.BoolVar(&cfg.scarce, "scarce", true, "after the load, the scenarios of a saturated upstream: shares of the queue by weight and between callers, upstream_limits, a pool of server keys with one revoked, memory with many requests queued")
	flag.BoolVar(&cfg.scarceOnly, "scarce-only", false, "run only the scenarios of a saturated upstream, rewriting their section of the report")
	flag.BoolVar(&cfg.features, "features", true, "after the load, what each feature costs: a ladder of module targets under small chats, each adding one feature to the one before, beside plain Caddy")
	flag.BoolVar(&cfg.featuresOnly, "features-only", false, "measure only what each feature costs, rewriting its section of the report")
	flag.DurationVar(&cfg.featuresDuration, "features-duration", 2*time.Second, "length of one measurement of a rung of the features' ladder, in -rounds rounds after -warmup each")
	flag.BoolVar(&cfg.burst, "burst", true, "after the load, one caller's burst on a fleet: "+fmt.Sprint(burstParallel)+" requests at once to two instances sharing Redis, beside other callers' steady load")
	flag.BoolVar(&cfg.burstOnly, "burst-only", false, "run only the burst scenario, rewriting its section of the report")
	flag.BoolVar(&cfg.capacity, "capacity", true, "after the load, the capacity model of the Redis store: Redis' commands, bytes and CPU per request, memory per caller in Redis and in an instance")
	flag.BoolVar(&cfg.capacityOnly, "capacity-only", false, "measure only the capacity model of the Redis store, rewriting its section of the report")
	flag.BoolVar(&cfg.pin, "pin", true, "during the load, run each Caddy on the last CPU and the harness on the others (taskset; 2 CPUs or more)")
	flag.BoolVar(&cfg.soak, "soak", false, "instead of the benchmark, the soak test: the module under mixed load at half its measured maximum (measured at -conns connections after -warmup; the paced chats keep at most -conns in flight), checked for errors and leaks")
	flag.DurationVar(&cfg.soakDuration, "soak-duration", 60*time.Second, "length of the soak's mixed load (at least 11s: RSS growth counts from second 10)")
	flag.IntVar(&cfg.soakStreams, "soak-streams", 100, "concurrent streams of the soak")
	flag.DurationVar(&cfg.soakChunkDelay, "soak-chunk-delay", 100*time.Millisecond, "the upstream's delay between stream events in the soak, so that streams stay open a while")
	flag.Parse()
	if cfg.rounds < 3 || cfg.conns < 1 || cfg.streams < 1 || cfg.duration <= 0 || cfg.featuresDuration <= 0 {
		fmt.Fprintln(os.Stderr, "bench: want -rounds 3 or more, and positive -conns, -streams, -duration and -features-duration")
		os.Exit(2)
	}
	if cfg.soak && (cfg.soakDuration < soakSettle+time.Second || cfg.soakStreams < 1) {
		fmt.Fprintf(os.Stderr, "bench: want -soak-duration of %v or more and positive -soak-streams\n", soakSettle+time.Second)
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	var err error
	switch {
	case cfg.soak:
		err = soak(ctx, cfg)
	case cfg.scarceOnly:
		err = scarceOnly(ctx, cfg)
	case cfg.featuresOnly:
		err = featuresOnly(ctx, cfg)
	case cfg.burstOnly:
		err = burstOnly(ctx, cfg)
	case cfg.capacityOnly:
		err = capacityOnly(ctx, cfg)
	default:
		err = run(ctx, cfg)
	}
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// run does the whole benchmark and writes the report. Every process it
// starts is stopped before it returns, also when ctx ends.
func run(ctx context.Context, cfg config) error {
	began := time.Now()
	wls, err := selectWorkloads(workloads(cfg), cfg.only)
	if err != nil {
		return err
	}
	if cfg.baseline != "" {
		targets = append(targets, baselineTarget(cfg.baseline))
		goals = append(goals, baselineGoal)
	}
	if cfg.burst {
		goals = append(goals, burstGoal)
	}
	rep := &report{cfg: cfg, began: began, workloads: wls}
	if rep.machine, err = describeMachine(cfg.caddy); err != nil {
		return err
	}
	fmt.Printf("bench: %d workloads × %d targets × %d rounds of %v (+%v warm-up): about %v of load\n",
		len(rep.workloads), len(targets), cfg.rounds, cfg.duration, cfg.warmup,
		time.Duration(len(rep.workloads)*len(targets)*cfg.rounds)*(cfg.duration+cfg.warmup))

	if cfg.micro {
		fmt.Println("bench: micro-benchmarks")
		// A package that fails is reported, and the load runs all the same.
		if rep.micro, rep.microErr = runMicro(ctx, cfg.goCmd); ctx.Err() != nil {
			return ctx.Err()
		}
		if rep.microErr != nil {
			fmt.Printf("bench: micro-benchmarks failed (%v); the report says so\n", rep.microErr)
		}
	}

	if cfg.pin {
		if err := pin(); err != nil {
			fmt.Printf("bench: the targets run unpinned: %v\n", err)
		}
	}
	if err := rep.runLoad(ctx); err != nil {
		return err
	}
	rep.elapsed = time.Since(began)
	if cfg.burst {
		fmt.Println("bench: one caller's burst on a fleet")
		if rep.burst, err = runBurst(ctx, cfg); err != nil {
			return fmt.Errorf("the burst scenario: %w", err)
		}
	}
	doc := rep.markdown()
	if cfg.features {
		f, err := runFeatures(ctx, cfg)
		if err != nil {
			return fmt.Errorf("what each feature costs: %w", err)
		}
		doc = append(append(doc, '\n'), f.markdown()...)
	}
	if cfg.scarce {
		s, err := runScarce(ctx, cfg)
		if err != nil {
			return fmt.Errorf("the scenarios of a saturated upstream: %w", err)
		}
		doc = append(append(doc, '\n'), s.markdown()...)
	}
	if rep.burst != nil {
		doc = append(append(doc, '\n'), rep.burst.markdown()...)
	}
	if cfg.capacity {
		fmt.Println("bench: the capacity model of the Redis store")
		c, err := runCapacity(ctx, cfg)
		if err != nil {
			return fmt.Errorf("the capacity model: %w", err)
		}
		doc = append(append(doc, '\n'), c.markdown()...)
	}
	if err := writeKeepingSoak(cfg.out, doc); err != nil {
		return err
	}
	fmt.Printf("bench: wrote %s in %v\n", cfg.out, time.Since(began).Round(time.Second))
	return nil
}

// runLoad starts the upstream and every target, measures every workload
// on them and profiles the module, and stops them all again.
func (rep *report) runLoad(ctx context.Context) error {
	cfg := rep.cfg
	dir, up, err := startUpstreamIn("vigthoria-bench-", cfg.chunkDelay)
	if err != nil {
		return err
	}
	defer up.closeAndRemove(dir)

	var redisURL string
	if needsRedis(targets) {
		redis, err := redistest.Run(dir)
		if err != nil {
			return err
		}
		defer redis.Stop()
		redisURL = redis.URL
	}
	insts, err := startTargets(ctx, targets, cfg.caddy, dir, up, redisURL)
	if err != nil {
		return err
	}
	defer stopAll(insts)

	if rep.results, err = measureAll(ctx, cfg, up, insts, rep.workloads); err != nil {
		return err
	}
	if cfg.profile > 0 {
		fmt.Printf("bench: CPU profiles of %s and %s under %s for %v each\n", caddyName, moduleName, profiledWorkload, cfg.profile)
		if rep.profile, rep.compared, err = profileModule(ctx, cfg, insts, rep.workloads, dir); err != nil {
			return fmt.Errorf("profiling: %w", err)
		}
	}
	return nil
}
