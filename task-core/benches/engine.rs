//! Task engine benchmark: throughput of run_in_thread -> completion, the latency from a worker
//! finishing to its completion running on the main loop, and from a submission to a sleeping
//! worker starting the job.
//!
//! `cargo bench -p task-core --bench engine` (add `-- --quick` or set `BENCH_QUICK=1` for a run
//! of a few seconds).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use task_core::{MainLoop, Pool, Task};

/// Tasks per second through run_in_thread -> completion, keeping at most `window` in flight.
fn throughput(threads: usize, n: u64, window: u64) -> f64 {
    let ml = MainLoop::new();
    let pool = Pool::new("bench", threads, window as usize).expect("pool");
    let done = Rc::new(Cell::new(0u64));
    let source = Arc::new(());
    let start = Instant::now();
    let mut submitted = 0u64;
    while done.get() < n {
        while submitted < n && submitted - done.get() < window {
            let d = done.clone();
            Task::<()>::new(source.clone(), move |_| d.set(d.get() + 1)).run_in_thread(
                &ml,
                &pool,
                |_| {},
            );
            submitted += 1;
        }
        if ml.dispatch() == 0 {
            ml.iterate(None);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    pool.shutdown();
    n as f64 / secs
}

/// Ping-pong: one task at a time; the worker stamps the time as its last act, the completion
/// measures how long it took to run. With `work` > 0 the worker first sleeps that long, so the
/// loop is parked (asleep in the kernel) when the worker finishes and the figure includes the
/// wake-up. Returns sorted latencies.
fn latency(samples: usize, work: Duration) -> Vec<Duration> {
    let ml = MainLoop::new();
    let pool = Pool::new("bench-lat", 1, 16).expect("pool");
    let out = Rc::new(RefCell::new(Vec::with_capacity(samples)));
    let source = Arc::new(());
    for _ in 0..samples {
        let o = out.clone();
        let before = o.borrow().len();
        Task::<(), Instant>::new(source.clone(), move |t| {
            let stamp = t.take_result().expect("stamp");
            o.borrow_mut().push(stamp.elapsed());
        })
        .run_in_thread(&ml, &pool, move |w| {
            if !work.is_zero() {
                std::thread::sleep(work);
            }
            w.set_result(Instant::now())
        });
        while out.borrow().len() == before {
            ml.iterate(None);
        }
    }
    pool.shutdown();
    let mut v = out.take();
    v.sort_unstable();
    v
}

/// Wake-up of a sleeping worker: the loop thread waits 200 µs (long enough for the worker to
/// have yielded its turns and gone to sleep), then submits a task stamped with the time; the
/// worker's first act measures how long it took to start. Returns sorted latencies.
fn wake_latency(samples: usize) -> Vec<Duration> {
    let ml = MainLoop::new();
    let pool = Pool::new("bench-wake", 1, 16).expect("pool");
    let out = Rc::new(RefCell::new(Vec::with_capacity(samples)));
    let source = Arc::new(());
    for _ in 0..samples {
        let idle = Instant::now();
        while idle.elapsed() < Duration::from_micros(200) {
            std::hint::spin_loop();
        }
        let o = out.clone();
        let before = o.borrow().len();
        let submitted = Instant::now();
        Task::<(), Duration>::new(source.clone(), move |t| {
            o.borrow_mut().push(t.take_result().expect("start"));
        })
        .run_in_thread(&ml, &pool, move |w| w.set_result(submitted.elapsed()));
        while out.borrow().len() == before {
            ml.iterate(None);
        }
    }
    pool.shutdown();
    let mut v = out.take();
    v.sort_unstable();
    v
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let (n, samples) = if quick {
        (200_000, 20_000)
    } else {
        (2_000_000, 100_000)
    };
    let window = 1024;
    println!(
        "task-core engine bench ({} mode)",
        if quick { "quick" } else { "full" }
    );
    println!("{:<52} {:>16}", "measure", "value");
    // Warm up (thread start, allocator).
    let _ = throughput(1, n / 10, window);
    for threads in [1, 2] {
        let tps = throughput(threads, n, window);
        println!(
            "{:<52} {:>16}",
            format!("throughput, {threads} worker(s), {n} tasks"),
            format!("{:.0} tasks/s", tps)
        );
    }
    let _ = latency(samples / 10, Duration::ZERO);
    let parked = Duration::from_micros(200);
    let runs = [
        ("busy loop", latency(samples, Duration::ZERO), samples),
        ("parked loop", latency(samples / 10, parked), samples / 10),
    ];
    for (what, v, count) in &runs {
        for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
            println!(
                "{:<52} {:>16}",
                format!("latency worker->completion {name}, {what} ({count})"),
                format!("{:.2} us", pct(v, p).as_secs_f64() * 1e6)
            );
        }
    }
    let wake = samples / 10;
    let v = wake_latency(wake);
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        println!(
            "{:<52} {:>16}",
            format!("latency submit->job start {name}, worker asleep ({wake})"),
            format!("{:.2} us", pct(&v, p).as_secs_f64() * 1e6)
        );
    }
}
