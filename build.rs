//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the `migrations/` folders.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
