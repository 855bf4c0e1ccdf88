//! The in-memory engine under real thread parallelism: reservations racing commits never admit
//! past the limit. Before the fix in `vendor/limitador` (values read under the reservation
//! registry's lock), a `Reserve` landing between a commit's adding of its tokens and the
//! release of its hold saw neither, and 4 threads of reserve(1) then commit(1) against a limit
//! of 2,000 admitted 2,001 or 2,002 in most rounds.

use limitador::limit::{Context, Expression, Limit, Namespace};
use limitador::RateLimiter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MAX: u64 = 2_000;

#[test]
fn reserves_racing_commits_never_admit_past_the_limit() {
    for round in 0..20 {
        let rl = Arc::new(RateLimiter::new(10_000));
        rl.add_limit(Limit::new(
            "race",
            MAX,
            60,
            vec![],
            Vec::<Expression>::default(),
        ));
        let ns: Namespace = "race".into();
        let admitted = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (rl, ns, admitted) = (rl.clone(), ns.clone(), admitted.clone());
                s.spawn(move || {
                    let ctx = Context::default();
                    loop {
                        let r = rl
                            .reserve(&ns, &ctx, 1, Some(Duration::from_secs(60)))
                            .expect("reserve");
                        if r.limited {
                            return;
                        }
                        admitted.fetch_add(1, Ordering::Relaxed);
                        rl.commit_reservation(&ns, &ctx, r.reservation_id.as_ref(), 1)
                            .expect("commit");
                    }
                });
            }
        });
        let admitted = admitted.load(Ordering::Relaxed);
        assert_eq!(
            admitted, MAX,
            "round {round}: {admitted} reservations of 1 admitted under a limit of {MAX}"
        );
    }
}
