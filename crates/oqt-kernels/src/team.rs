//! A small team of threads that spin between jobs, for the runtime's parallel
//! loops.
//!
//! **Why not rayon here**: a decode step is ~200 parallel loops of 20–100 µs
//! each. rayon parks idle workers on a futex and wakes them per loop; in a VM a
//! wake-up costs tens of µs, so on 2 cores the second core mostly arrives after
//! the work is done (measured: 1 thread 68 tok/s, 2 threads only 99). Phone and
//! llama.cpp runtimes keep their threads spinning between the ops of a
//! forward pass for the same reason. The team's workers spin for
//! [`SPIN_FOR`] after their last job, then park, so an idle process costs
//! nothing.
//!
//! **The protocol**: one atomic word holds `(job epoch << 32) | next task`.
//! The caller publishes a job by storing the job and a new epoch with task 0;
//! workers (and the caller) claim tasks by compare-and-swap on that word, so a
//! worker still holding an old epoch can never claim a task of a newer job,
//! and a claimed task keeps its job alive (the caller waits for every claimed
//! task to finish before it returns). One caller at a time: a second caller —
//! another thread, or a task that starts a loop of its own — runs its loop
//! serially instead of waiting.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
pub const SPIN_FOR: Duration = Duration::from_millis(3);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// `(epoch << 32) | next task index`.
    word: AtomicU64,
    /// The current job, lifetime erased; valid while any of its tasks is claimed
    /// and unfinished (see the module docs).
    job: UnsafeCell<Option<*const Job>>,
    tasks: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the one caller holding `Team::caller`, before
// the epoch that publishes it (Release), and read by threads that claimed a task
// of that epoch (Acquire); the job it points to is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The team: `threads − 1` workers plus the calling thread.
pub struct Team {
    shared: Arc<Shared>,
    caller: Mutex<()>,
    threads: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` (the caller counts as one).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            word: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            tasks: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("oqt-team-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawn a team thread")
            })
            .collect();
        Self {
            shared,
            caller: Mutex::new(()),
            threads,
            handles,
        }
    }

    /// The process-wide team, sized like rayon's pool when first used (the
    /// CLI's `--threads`).
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads()))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `task(i)` for every `i < tasks`, spread over the team; returns when
    /// all are done. A panic in a task is raised again here.
    pub fn run(&self, tasks: usize, task: impl Fn(usize) + Sync) {
        if tasks == 0 {
            return;
        }
        let guard = match self.caller.try_lock() {
            Ok(g) if self.threads > 1 && tasks > 1 => g,
            // Single thread, single task, or the team is busy (another caller, or
            // a nested loop): run here.
            _ => return (0..tasks).for_each(task),
        };
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync + '_) = &task;
        // SAFETY: the job outlives every use — see `Shared::job`.
        let job: &'static Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        // SAFETY: no task of the previous epoch is claimable (its index ran out) and
        // all its claimed tasks finished before the previous `run` returned.
        unsafe { *s.job.get() = Some(job as *const Job) };
        s.tasks.store(tasks, Relaxed);
        s.done.store(0, Relaxed);
        let epoch = (s.word.load(Relaxed) >> 32).wrapping_add(1) & 0xFFFF_FFFF;
        s.word.store(epoch << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _lock = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s, epoch);
        while s.done.load(Acquire) < tasks {
            std::hint::spin_loop();
        }
        drop(guard);
        if s.panicked.swap(false, Relaxed) {
            panic!("a task of a parallel loop panicked");
        }
    }

    /// `out` in chunks of `chunk` elements, `task(index, chunk)` for each, over the team.
    pub fn for_each_chunk_mut<T: Send>(&self, out: &mut [T], chunk: usize, task: impl Fn(usize, &mut [T]) + Sync) {
        let chunk = chunk.max(1);
        let (len, base) = (out.len(), SendPtr(out.as_mut_ptr()));
        self.run(len.div_ceil(chunk), |i| {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: chunks are disjoint and inside `out`, which outlives the loop.
            let slice = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            task(i, slice)
        });
    }
}

/// A raw pointer shared by the tasks of one loop (each writes its own part).
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _lock = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Claim and run tasks of `epoch` until none is left.
fn work(s: &Shared, epoch: u64) {
    loop {
        let word = s.word.load(Acquire);
        if word >> 32 != epoch {
            return;
        }
        let i = (word & 0xFFFF_FFFF) as usize;
        if i >= s.tasks.load(Relaxed) {
            return;
        }
        if s.word.compare_exchange_weak(word, word + 1, AcqRel, Relaxed).is_err() {
            continue;
        }
        // SAFETY: task `i` of this epoch is claimed and unfinished, so the job is alive.
        let job = unsafe { &*(*s.job.get()).expect("a published job") };
        if catch_unwind(AssertUnwindSafe(|| job(i))).is_err() {
            s.panicked.store(true, Relaxed);
        }
        s.done.fetch_add(1, Release);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let epoch = s.word.load(Acquire) >> 32;
            if epoch != seen {
                break epoch;
            }
            if s.shutdown.load(Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || since.elapsed() < SPIN_FOR {
                std::hint::spin_loop();
                continue;
            }
            // Park until the next job (re-checked under the lock: no lost wake-up).
            let mut lock = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while s.word.load(SeqCst) >> 32 == seen && !s.shutdown.load(SeqCst) {
                lock = s.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        };
        seen = epoch;
        work(s, epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let team = Team::new(3);
        for tasks in [1usize, 2, 5, 64, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            team.run(tasks, |i| {
                counts[i].fetch_add(1, Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Relaxed) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn chunks_cover_the_output_after_the_workers_park() {
        let team = Team::new(2);
        let mut out = vec![0usize; 103];
        team.for_each_chunk_mut(&mut out, 10, |t, c| c.iter_mut().for_each(|v| *v = t + 1));
        std::thread::sleep(SPIN_FOR * 3);
        team.for_each_chunk_mut(&mut out, 10, |t, c| c.iter_mut().for_each(|v| *v += 100 * (t + 1)));
        assert!(out.iter().enumerate().all(|(i, &v)| v == 101 * (i / 10 + 1)));
    }

    #[test]
    fn concurrent_and_nested_callers_run_serially_and_correctly() {
        let team = Team::new(2);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        let sum = AtomicUsize::new(0);
                        team.run(8, |i| {
                            team.run(4, |j| {
                                sum.fetch_add(i * 4 + j, Relaxed);
                            })
                        });
                        assert_eq!(sum.load(Relaxed), (0..32).sum::<usize>());
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| team.run(4, |i| assert!(i != 2, "task two"))));
        assert!(r.is_err());
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        team.run(4, |_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 4);
    }
}
