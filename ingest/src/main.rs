#[tokio::main]
async fn main() -> std::process::ExitCode {
    msghash_common::service::main::<ingest::Application>().await
}
