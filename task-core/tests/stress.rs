//! Many tasks submitted from several threads: every completion runs once, on the main thread.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use task_core::{MainLoop, Pool, Task};

const SUBMITTERS: usize = 4;
const PER_SUBMITTER: usize = 25_000;
const TOTAL: usize = SUBMITTERS * PER_SUBMITTER;

/// Completion counter and checksum, owned by the loop thread.
type LoopState = (Rc<Cell<usize>>, Rc<Cell<u64>>);

struct Source {
    drops: Arc<AtomicUsize>,
}
impl Drop for Source {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn hundred_thousand_tasks_from_several_threads() {
    let ml = MainLoop::new();
    let main_id = thread::current().id();
    let pool = Arc::new(Pool::new("stress", 2, 256).unwrap());
    let completions = Rc::new(Cell::new(0usize));
    let worker_runs = Arc::new(AtomicUsize::new(0));
    let source_drops = Arc::new(AtomicUsize::new(0));
    let sum = Rc::new(Cell::new(0u64));

    // Completions are not Send: each submitter asks the loop to create and start its tasks.
    // The loop thread keeps a counter in a thread-local cell the closures reach through it.
    thread_local! {
        static STATE: std::cell::RefCell<Option<LoopState>> = const { std::cell::RefCell::new(None) };
    }
    STATE.with(|s| *s.borrow_mut() = Some((completions.clone(), sum.clone())));

    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|t| {
            let h = ml.handle();
            let pool = pool.clone();
            let (runs, drops) = (worker_runs.clone(), source_drops.clone());
            thread::spawn(move || {
                for i in 0..PER_SUBMITTER {
                    let pool = pool.clone();
                    let (runs, drops) = (runs.clone(), drops.clone());
                    let value = (t * PER_SUBMITTER + i) as u64;
                    assert!(h.invoke_with_loop(move |ml| {
                        let src = Arc::new(Source { drops });
                        let task = Task::<Source, u64>::new(src, move |done| {
                            assert_eq!(thread::current().id(), main_id);
                            let v = done.take_result().expect("result");
                            STATE.with(|s| {
                                let s = s.borrow();
                                let (c, sum) = s.as_ref().expect("main thread state");
                                c.set(c.get() + 1);
                                sum.set(sum.get() + v);
                            });
                        });
                        task.run_in_thread(ml, &pool, move |w| {
                            assert!(thread::current().name().unwrap().starts_with("stress-"));
                            runs.fetch_add(1, Ordering::Relaxed);
                            w.set_result(value);
                        });
                    }));
                }
            })
        })
        .collect();

    let end = Instant::now() + Duration::from_secs(120);
    while completions.get() < TOTAL {
        assert!(Instant::now() < end, "stress test did not finish");
        ml.iterate(Some(Duration::from_millis(50)));
    }
    for s in submitters {
        s.join().unwrap();
    }
    // Nothing more arrives.
    ml.iterate(Some(Duration::from_millis(20)));
    assert_eq!(completions.get(), TOTAL);
    assert_eq!(worker_runs.load(Ordering::SeqCst), TOTAL);
    assert_eq!(source_drops.load(Ordering::SeqCst), TOTAL);
    assert_eq!(sum.get(), (TOTAL as u64) * (TOTAL as u64 - 1) / 2);
    assert_eq!(ml.tasks_in_flight(), 0);
}
