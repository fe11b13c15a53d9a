use super::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

fn counts<J>(board: &Board<J>) -> Counts {
    board.snapshot().counts
}

/// The next job of `worker`, if one is queued.
fn take<J>(board: &Board<J>, worker: usize) -> Option<Taken<J>> {
    board.take(worker, &mut None)
}

/// Finish `taken` on worker 0: whether its outcome is to be delivered, and
/// the id of the job the worker took next, if any.
fn finish<J>(board: &Board<J>, taken: &Taken<J>) -> (bool, Option<Id>) {
    let (deliver, next) = board.finish(taken.id, taken.started, 0, &mut None);
    (deliver, next.map(|next| next.id))
}

#[test]
fn a_job_goes_from_queued_to_running_to_done_once() {
    let board = Board::default();
    let id = board.submit(7).unwrap();
    assert_eq!((id, board.status(id), board.status(id + 1), board.status(0)), (1, Some(Status::Queued), None, None));
    let taken = take(&board, 3).unwrap();
    assert_eq!((taken.id, taken.job, board.status(id)), (id, 7, Some(Status::Running)));
    assert_eq!(finish(&board, &taken), (true, None));
    assert_eq!(board.cancel(id), Cancelled::No, "its outcome is on its way");
    assert_eq!(board.status(id), Some(Status::Running), "running until the outcome is read");
    board.settle([(id, false)]);
    board.settle([(id, true)]);
    board.lose([id]);
    assert_eq!(board.status(id), Some(Status::Finished));
    let expected = Counts { submitted: 1, done: 1, ..Counts::default() };
    assert_eq!(counts(&board), expected, "ended once, whatever came after");
    let snapshot = board.snapshot();
    assert!(snapshot.run_max >= snapshot.run_mean && snapshot.wait_max >= snapshot.wait_mean);
}

#[test]
fn a_cancelled_queued_job_is_skipped_by_take() {
    let board = Board::default();
    let (first, second) = (board.submit(1).unwrap(), board.submit(2).unwrap());
    assert_eq!(board.cancel(first), Cancelled::Queued);
    assert_eq!(board.cancel(first), Cancelled::No);
    assert_eq!(take(&board, 0).unwrap().id, second);
    assert_eq!(counts(&board), Counts { submitted: 2, running: 1, cancelled: 1, ..Counts::default() });
}

#[test]
fn a_job_cancelled_while_running_produces_nothing() {
    let board = Board::default();
    let id = board.submit(1).unwrap();
    let taken = take(&board, 5).unwrap();
    assert_eq!(board.cancel(id), Cancelled::Running { worker: 5 });
    assert!(taken.control.is_cancelled());
    assert_eq!(finish(&board, &taken), (false, None), "its outcome is not delivered");
    board.lose([id]);
    assert_eq!(counts(&board), Counts { submitted: 1, cancelled: 1, ..Counts::default() });
    assert_eq!(board.snapshot().run_max, 0.0, "a cancelled run is not timed");
}

#[test]
fn a_lost_outcome_ends_its_job_as_cancelled() {
    let board = Board::default();
    let id = board.submit(1).unwrap();
    let taken = take(&board, 0).unwrap();
    assert_eq!(finish(&board, &taken), (true, None));
    assert!(board.lose([id]));
    board.settle([(id, false)]);
    assert_eq!(counts(&board), Counts { submitted: 1, cancelled: 1, ..Counts::default() });
}

#[test]
fn lost_jobs_are_kept_until_taken_once_in_order() {
    let board = Board::default();
    let mut ids = Vec::new();
    for job in 0..3 {
        ids.push(board.submit(job).unwrap());
        let taken = take(&board, 0).unwrap();
        assert_eq!(finish(&board, &taken), (true, None));
    }
    board.settle([(ids[1], false)]);
    assert!(board.lose([ids[2], ids[1], ids[0]]), "two of them ended here");
    assert!(!board.lose([ids[0]]), "a job ends once");
    assert!(board.has_lost());
    let lost = board.take_lost();
    assert_eq!(lost, [ids[2], ids[0]]);
    assert!(!board.has_lost() && board.take_lost().is_empty(), "taken once");
    board.give_back_lost(lost);
    assert_eq!(board.take_lost(), [ids[2], ids[0]], "given back, still in order");
}

#[test]
fn close_cancels_queued_and_running_jobs_but_not_outcomes_on_their_way() {
    let board = Board::default();
    let ids: Vec<Id> = (0..4).map(|job| board.submit(job).unwrap()).collect();
    let produced = take(&board, 0).unwrap();
    let running = take(&board, 1).unwrap();
    // Worker 0 takes the next job as it finishes.
    assert_eq!(finish(&board, &produced), (true, Some(ids[2])));
    let mut interrupted = board.close();
    interrupted.sort();
    assert_eq!(interrupted, [0, 1]);
    assert!(running.control.is_cancelled());
    assert_eq!(board.submit(9), Err(9));
    assert!(take(&board, 2).is_none(), "nothing is owed to a worker once closed");
    assert_eq!(board.status(ids[0]), Some(Status::Running));
    assert_eq!(ids[1..].iter().map(|&id| board.status(id)).collect::<Vec<_>>(), [Some(Status::Finished); 3]);
    board.settle([(produced.id, false)]);
    assert_eq!(counts(&board), Counts { submitted: 4, done: 1, cancelled: 3, ..Counts::default() });
    assert!(board.close().is_empty());
}

#[test]
fn take_waits_for_a_job_or_the_close() {
    let board = Arc::new(Board::<u32>::default());
    let worker = {
        let board = Arc::clone(&board);
        thread::spawn(move || (take(&board, 0).map(|t| t.job), take(&board, 0).map(|t| t.job)))
    };
    thread::sleep(Duration::from_millis(20));
    let id = board.submit(4).unwrap();
    // Taken (by the first take, or by one that did not wait yet): the
    // second take then waits until the close.
    while board.status(id) != Some(Status::Running) {
        thread::yield_now();
    }
    board.close();
    assert_eq!(worker.join().unwrap(), (Some(4), None));
}

/// Workers take jobs and settle or lose their outcomes, a canceller
/// cancels at random, a watcher checks every snapshot: each job ends
/// exactly once, and the counts always add up.
#[test]
fn under_contention_each_job_ends_exactly_once_and_the_counts_add_up() {
    const JOBS: u64 = 20_000;
    let board = Arc::new(Board::<u64>::default());
    let endings: Arc<Vec<AtomicU64>> = Arc::new((0..=JOBS).map(|_| AtomicU64::new(0)).collect());
    let end = |endings: &Vec<AtomicU64>, id: Id| endings[id as usize].fetch_add(1, Ordering::SeqCst);
    let workers: Vec<_> = (0..3)
        .map(|worker| {
            let (board, endings) = (Arc::clone(&board), Arc::clone(&endings));
            thread::spawn(move || {
                board.serve(
                    worker,
                    |taken| taken.job,
                    |id, job| {
                        if job % 5 == 0 {
                            board.lose([id]);
                        } else {
                            board.settle([(id, job % 2 == 0)]);
                        }
                        end(&endings, id);
                    },
                )
            })
        })
        .collect();
    let (watching, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let watcher = {
        let (board, watching, done) = (Arc::clone(&board), Arc::clone(&watching), Arc::clone(&done));
        thread::spawn(move || {
            let mut checks = 0;
            while !done.load(Ordering::SeqCst) {
                let c = board.snapshot().counts;
                assert_eq!(c.queued + c.running + c.done + c.failed + c.cancelled, c.submitted);
                checks += 1;
                watching.store(true, Ordering::SeqCst);
            }
            checks
        })
    };
    // The jobs move while it watches.
    while !watching.load(Ordering::SeqCst) {
        thread::yield_now();
    }
    let canceller = {
        let (board, endings) = (Arc::clone(&board), Arc::clone(&endings));
        thread::spawn(move || {
            let mut seed: u64 = 99;
            for _ in 0..JOBS {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let id = 1 + (seed >> 33) % JOBS;
                if board.cancel(id) != Cancelled::No {
                    end(&endings, id);
                }
            }
        })
    };
    for job in 1..=JOBS {
        board.submit(job).unwrap();
    }
    canceller.join().unwrap();
    // Let the workers end every job, then close (which would end the
    // running ones itself, uncounted here).
    while board.snapshot().counts.queued + board.snapshot().counts.running > 0 {
        thread::yield_now();
    }
    board.close();
    workers.into_iter().for_each(|w| w.join().unwrap());
    done.store(true, Ordering::SeqCst);
    assert!(watcher.join().unwrap() > 0);
    let c = counts(&board);
    assert_eq!((c.queued, c.running, c.submitted), (0, 0, JOBS));
    assert!(c.cancelled > 0 && c.done > 0 && c.failed > 0, "{c:?}");
    for id in 1..=JOBS {
        assert_eq!(endings[id as usize].load(Ordering::SeqCst), 1, "job {id} ended once");
    }
}
