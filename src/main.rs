fn main() -> std::process::ExitCode {
    nbdcrypt::cli::main()
}
