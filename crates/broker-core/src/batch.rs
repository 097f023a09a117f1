//! Requests made in the same pass of a runtime, gathered into one batch.
//!
//! A [`Batcher`] hands what its callers ask, in the order asked, to a gathering task. That
//! task wakes once for all the requests made before it runs, takes them all (up to a
//! maximum) and starts one batch of them, then waits for the next request; the batches it
//! started run on their own, so a slow one holds back nothing. Under load a batch holds
//! what many tasks asked in one pass; at light load it holds one request, which waits for
//! no other: nothing waits on a timer.
//!
//! The broker sends each batch as one script call, whose fixed cost in Redis (the call, its
//! `MULTI`/`EXEC` in the AOF, the stats counters' writes) is then paid once per batch.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

type Request<T, R> = (T, oneshot::Sender<R>);

/// The asking end; cloned for every task that asks.
pub struct Batcher<T, R> {
    tx: mpsc::UnboundedSender<Request<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// How much one batch may hold: at most `items` requests, and no more than `bytes` of them
/// (by the batcher's measure) unless a single request is larger, which then goes alone. The
/// bytes bound keeps one script call, which Redis runs without interruption, short when
/// requests carry large bodies (audio).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub items: usize,
    pub bytes: usize,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// A batcher whose batches, within `limits` (`size` measures a request), go to `run`,
    /// which answers each request, in order. The gathering task is the future returned with
    /// it, for the caller to spawn on the runtime the batches are to run on; it ends when
    /// every [`Batcher`] is gone.
    pub fn new<S, F, Fut>(
        limits: Limits,
        size: S,
        run: F,
    ) -> (Self, impl Future<Output = ()> + Send)
    where
        S: Fn(&T) -> usize + Send + 'static,
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request<T, R>>();
        let max = limits.items.max(1);
        let gather = async move {
            // A request that did not fit the batch before it: the first of the next.
            let mut held: Option<Request<T, R>> = None;
            loop {
                let first = match held.take() {
                    Some(request) => request,
                    None => match rx.recv().await {
                        Some(request) => request,
                        None => return,
                    },
                };
                let mut bytes = size(&first.0);
                let mut requests = vec![first];
                while requests.len() < max {
                    let Ok(request) = rx.try_recv() else { break };
                    bytes = bytes.saturating_add(size(&request.0));
                    if bytes > limits.bytes {
                        held = Some(request);
                        break;
                    }
                    requests.push(request);
                }
                let (items, answers): (Vec<T>, Vec<oneshot::Sender<R>>) =
                    requests.into_iter().unzip();
                let batch = run(items);
                tokio::spawn(async move {
                    for (answer, result) in answers.into_iter().zip(batch.await) {
                        // The asker may have given up (its request was cut short).
                        let _ = answer.send(result);
                    }
                });
            }
        };
        (Self { tx }, gather)
    }

    /// Asks for `item` to go in the next batch, and waits for its answer; `None` when the
    /// gathering task is gone, or `run` gave fewer answers than it got requests.
    pub async fn call(&self, item: T) -> Option<R> {
        let (answer, answered) = oneshot::channel();
        self.tx.send((item, answer)).ok()?;
        answered.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A batcher that doubles what it gets and records each batch's size.
    fn doubler(max: usize) -> (Batcher<u32, u32>, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let limits = Limits {
            items: max,
            bytes: usize::MAX,
        };
        let (batcher, gather) = Batcher::new(
            limits,
            |_: &u32| 1,
            move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.len());
                async move { items.into_iter().map(|i| i * 2).collect() }
            },
        );
        tokio::spawn(gather);
        (batcher, sizes)
    }

    /// Asks for each item from its own task, all spawned in one pass, and returns the
    /// answers in the order asked.
    async fn ask_all(batcher: &Batcher<u32, u32>, items: &[u32]) -> Vec<Option<u32>> {
        let asks: Vec<_> = items
            .iter()
            .map(|&i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        let mut answers = Vec::new();
        for ask in asks {
            answers.push(ask.await.unwrap());
        }
        answers
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_of_one_pass_go_in_one_batch_and_each_gets_its_own_answer() {
        let (batcher, sizes) = doubler(64);
        let items: Vec<u32> = (0..10).collect();
        let answers = ask_all(&batcher, &items).await;
        assert_eq!(
            answers,
            items.iter().map(|i| Some(i * 2)).collect::<Vec<_>>()
        );
        assert_eq!(*sizes.lock().unwrap(), [10]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_holds_at_most_max_requests() {
        let (batcher, sizes) = doubler(4);
        let items: Vec<u32> = (0..10).collect();
        let answers = ask_all(&batcher, &items).await;
        assert_eq!(
            answers,
            items.iter().map(|i| Some(i * 2)).collect::<Vec<_>>()
        );
        assert_eq!(*sizes.lock().unwrap(), [4, 4, 2]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_holds_no_more_bytes_than_its_limit_but_a_large_request_goes_alone() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let limits = Limits {
            items: 64,
            bytes: 10,
        };
        // Each request's size is its value.
        let (batcher, gather) = Batcher::new(
            limits,
            |n: &u32| *n as usize,
            move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.clone());
                async move { items }
            },
        );
        tokio::spawn(gather);
        let items = [4, 4, 4, 30, 1, 1];
        let answers = ask_all(&batcher, &items).await;
        assert_eq!(answers, items.map(Some));
        let batches: Vec<Vec<u32>> = sizes.lock().unwrap().clone();
        assert_eq!(batches, [vec![4, 4], vec![4], vec![30], vec![1, 1]]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_alone_is_not_held_back() {
        let (batcher, sizes) = doubler(64);
        assert_eq!(batcher.call(1).await, Some(2));
        assert_eq!(batcher.call(2).await, Some(4));
        assert_eq!(*sizes.lock().unwrap(), [1, 1]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn missing_answers_and_a_stopped_gatherer_give_none() {
        let eight = Limits {
            items: 8,
            bytes: usize::MAX,
        };
        let (short, gather) = Batcher::new(
            eight,
            |_: &u32| 1,
            |items: Vec<u32>| async move { items.into_iter().skip(1).collect::<Vec<u32>>() },
        );
        tokio::spawn(gather);
        let (a, b) = tokio::join!(short.call(1), short.call(2));
        assert_eq!((a, b), (Some(2), None));

        let (stopped, gather) =
            Batcher::new(eight, |_: &u32| 1, |items: Vec<u32>| async move { items });
        drop(gather);
        assert_eq!(stopped.call(1).await, None);
    }
}
