//! The frame of the tests that run on every backend: one fresh [`Engine`] (database,
//! simulator, scanner) per backend this run covers, torn down after the test's body.

use wxpay_reconciler::config::Settings;

use crate::db::{Kind, backends};
use crate::engine::Engine;

/// Runs `test` on every backend this run covers, each on a fresh engine.
pub async fn for_each_backend(test: impl AsyncFnMut(Kind, &Engine)) {
    for_each_backend_with(|_| {}, test).await;
}

/// [`for_each_backend`] with the engine's settings changed by `tweak` first.
pub async fn for_each_backend_with(
    tweak: impl Fn(&mut Settings),
    mut test: impl AsyncFnMut(Kind, &Engine),
) {
    for db in backends().await {
        let kind = db.kind;
        let e = Engine::with(db, &tweak).await;
        test(kind, &e).await;
        e.finish().await;
    }
}
