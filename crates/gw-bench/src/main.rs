#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    gw_bench::cli::main()
}
