//! Applies Tollgate's ClickHouse migrations: `tollgate-migrate --url URL --database DB`.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Apply Tollgate's ClickHouse migrations (idempotent)")]
struct Args {
    #[arg(
        long,
        env = "TOLLGATE_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    url: String,
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_DB", default_value = "tollgate")]
    database: String,
    #[arg(
        long,
        env = "TOLLGATE_CLICKHOUSE_ADMIN_USER",
        default_value = "default"
    )]
    user: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let client = clickhouse::Client::default()
        .with_url(&args.url)
        .with_user(&args.user)
        .with_validation(false);
    match tollgate_schemas::migrations::apply(&client, &args.database).await {
        Ok(applied) => {
            eprintln!(
                "migrations: database {} at version {} (applied now: {applied:?})",
                args.database,
                tollgate_schemas::migrations::latest_version()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migrations failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
