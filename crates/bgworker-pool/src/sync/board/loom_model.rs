//! Loom models of the board: a job ends exactly once when a cancel, a
//! close, its finish and the fate of its outcome race; an idle worker
//! misses neither a submit nor the close.
//!
//! The workers run `Board::serve`, the loop of the real ones; the main
//! thread plays the Lua thread.

use super::*;
use loom::sync::mpsc;
use loom::thread;

fn counts<J>(board: &Board<J>) -> Counts {
    board.snapshot().counts
}

/// The Lua thread cancels a job while a worker takes it, runs it and
/// loses its outcome (its carrier refused: no dispatcher), as the worker's
/// thread finds out. The job ends once: by the cancel, or by the loss of
/// an outcome that was delivered only if the cancel came too late. The
/// close that follows lets the worker go.
#[test]
fn a_cancel_racing_a_run_and_its_lost_outcome_ends_the_job_once() {
    loom::model(|| {
        let board = Arc::new(Board::default());
        let id = board.submit(()).unwrap();
        let worker = {
            let board = Arc::clone(&board);
            thread::spawn(move || {
                let (mut delivered, mut lost) = (0, 0);
                board.serve(
                    0,
                    |_| (),
                    |id, ()| {
                        delivered += 1;
                        lost += usize::from(board.lose([id]));
                    },
                );
                (delivered, lost)
            })
        };
        let cancelled = usize::from(board.cancel(id) != Cancelled::No);
        board.close();
        let (delivered, lost) = worker.join().unwrap();
        assert_eq!(cancelled + delivered, 1, "cancelled {cancelled}, delivered {delivered}");
        assert_eq!(lost, delivered, "a delivered outcome's loss ends its job");
        assert_eq!(counts(&board), Counts { submitted: 1, cancelled: 1, ..Counts::default() });
    });
}

/// The Lua thread closes while a worker takes, runs and finishes the only
/// job; an outcome the worker delivers is decoded (settled) afterwards.
/// The job ends once: cancelled by the close (queued, or running with its
/// worker to interrupt) or done, never both.
#[test]
fn a_close_racing_a_run_ends_the_job_once() {
    loom::model(|| {
        let board = Arc::new(Board::default());
        let id = board.submit(()).unwrap();
        let worker = {
            let board = Arc::clone(&board);
            thread::spawn(move || {
                let mut delivered = Vec::new();
                board.serve(0, |_| (), |id, ()| delivered.push(id));
                delivered
            })
        };
        let interrupted = board.close();
        let delivered = worker.join().unwrap();
        assert!(interrupted.is_empty() || delivered.is_empty(), "an interrupted job's outcome was delivered");
        board.settle(delivered.iter().map(|&id| (id, false)));
        let done = delivered.len() as u64;
        assert!(delivered.iter().all(|&ended| ended == id));
        assert_eq!(counts(&board), Counts { submitted: 1, done, cancelled: 1 - done, ..Counts::default() });
    });
}

/// A worker, idle or about to be, and two submits, the second once the
/// first job's outcome came: each job runs once and is delivered (the Lua
/// thread waits for it, so a submit that arrives unseen, or that wakes
/// nobody while the worker sleeps, is a deadlock), and the close then
/// releases the worker from its wait.
#[test]
fn an_idle_worker_misses_neither_a_submit_nor_the_close() {
    loom::model(|| {
        let board = Arc::new(Board::default());
        let (outcomes, delivered) = mpsc::channel();
        let worker = {
            let board = Arc::clone(&board);
            thread::spawn(move || board.serve(0, |taken| taken.job, |id, job| outcomes.send((id, job)).unwrap()))
        };
        for job in [10, 20] {
            let id = board.submit(job).unwrap();
            assert_eq!(delivered.recv().unwrap(), (id, job), "each job runs once");
            board.settle([(id, false)]);
        }
        board.close();
        worker.join().unwrap();
        assert_eq!(counts(&board), Counts { submitted: 2, done: 2, ..Counts::default() });
    });
}

/// A worker runs a job that the Lua thread cancels; a second job waits in
/// the queue. The retirement's check (with no grace left) races the
/// worker's return from the cancelled job. Either the worker was back in
/// time, and runs the second job itself, or it was retired, and leaves
/// `serve` without taking it (a replacement would), never both; a retired
/// worker counts as abandoned until it leaves. (Loom reports a deadlock if
/// the worker waits for a job it may not take.)
#[test]
fn a_worker_back_from_a_cancelled_job_is_retired_or_serves_on_never_both() {
    loom::model(|| {
        let board = Arc::new(Board::default());
        let (started, running) = mpsc::channel();
        let (back, returns) = mpsc::channel::<()>();
        let first = board.submit(1).unwrap();
        let worker = {
            let board = Arc::clone(&board);
            thread::spawn(move || {
                let mut ran = Vec::new();
                board.serve(
                    0,
                    |taken| {
                        ran.push(taken.job);
                        if taken.job == 1 {
                            started.send(()).unwrap();
                            // Stuck until the Lua thread let it return.
                            returns.recv().unwrap();
                        }
                    },
                    |_, ()| {},
                );
                ran
            })
        };
        running.recv().unwrap();
        assert_eq!(board.cancel(first), Cancelled::Running { worker: 0 });
        let second = board.submit(2).unwrap();
        back.send(()).unwrap();
        let retired = board.retire_stuck(Duration::ZERO);
        if retired.is_empty() {
            // It was back: it runs the second job; then the close lets it go.
            assert_eq!(board.snapshot().abandoned, 0);
            while board.status(second) != Some(Status::Finished) && board.status(second) != Some(Status::Running) {
                thread::yield_now();
            }
            board.close();
            assert_eq!(worker.join().unwrap(), [1, 2]);
        } else {
            assert_eq!(retired, [0]);
            // Retired: it leaves without the second job, which stays queued.
            assert_eq!(worker.join().unwrap(), [1]);
            assert_eq!(board.status(second), Some(Status::Queued));
            assert_eq!(board.snapshot().abandoned, 0, "it left: no longer abandoned");
            board.close();
        }
    });
}
