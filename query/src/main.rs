#[tokio::main]
async fn main() -> std::process::ExitCode {
    msghash_common::service::main::<query::Application>().await
}
