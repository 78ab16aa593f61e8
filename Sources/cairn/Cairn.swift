import ArgumentParser
import CairnCore
import Engine
import Foundation
import Repository
import RepositoryFormat
#if canImport(Glibc)
import Glibc
#endif

let cairnVersion = "0.1.0"

@main
struct Cairn: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn",
        abstract: "Agentless image-level backup and recovery for virtual machines.",
        discussion: """
        Environment: CAIRN_REPO (repository directory), CAIRN_PASSWORD (passphrase).
        Exit status: 0 ok, 1 failure, 3 corrupt data found, 10 no repository, 11 locked,
        12 wrong password, 64 usage, 130 interrupted (see docs/CLI.md).
        """,
        version: "cairn \(cairnVersion)",
        subcommands: [Init.self, Backup.self, Snapshots.self, Restore.self, Ls.self, Cat.self, RestoreFiles.self, Diff.self, Find.self, Serve.self, InstantRestore.self, SandboxCommand.self, Check.self, Verify.self, Stats.self, Prune.self, GC.self, Protect.self, Unprotect.self, Repair.self, ThawWatchdog.self]
    )

    static func main() {
        Trace.mark("start")
        tuneMallocForLargeBuffers()
        signal(SIGPIPE, SIG_IGN)
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let e as CairnError {
            printError("cairn: error: \(e.description)")
            Foundation.exit(ExitStatus.of(e).rawValue)
        } catch {
            exit(withError: error)
        }
    }
}

/// Options every repository command takes.
struct RepositoryOptions: ParsableArguments {
    @Option(name: [.short, .long], help: "Repository directory (default: $CAIRN_REPO).")
    var repo: String?

    @Option(name: .long, help: "Read the password from this file (default: $CAIRN_PASSWORD, or ask on a terminal).")
    var passwordFile: String?

    @Flag(name: .long, help: "Machine-readable JSON output.")
    var json = false

    @Flag(name: [.short, .long], help: "Print only errors and results.")
    var quiet = false

    @Option(name: .long, help: "Wait this long for a conflicting lock to go away (e.g. 30s, 5m, 1h; default: do not wait).")
    var retryLock: String?

    func repositoryPath() throws -> String {
        guard let p = repo ?? ProcessInfo.processInfo.environment["CAIRN_REPO"], !p.isEmpty else {
            throw CairnError(.usage, "no repository given", hint: "use --repo DIR or set CAIRN_REPO")
        }
        return p
    }

    func password(confirm: Bool = false) throws -> String? {
        if let passwordFile {
            guard let d = FileManager.default.contents(atPath: passwordFile) else {
                throw CairnError(.usage, "cannot read the password file", path: passwordFile)
            }
            var s = String(decoding: d, as: UTF8.self)
            while s.hasSuffix("\n") || s.hasSuffix("\r") { s.removeLast() }
            return s
        }
        if let env = ProcessInfo.processInfo.environment["CAIRN_PASSWORD"] { return env }
        guard let p = promptPassword("enter password for repository: ") else { return nil }
        if confirm {
            guard promptPassword("enter the password again: ") == p else { throw CairnError(.usage, "the passwords do not match") }
        }
        return p
    }

    func open() throws -> Repository {
        let path = try repositoryPath()
        let wait = try retryLock.map { try parseWaitDuration($0) } ?? 0
        let repo = try Repository.open(path: path, lockWait: wait) { try password() }
        Trace.mark("repository open (key unwrapped)")
        return repo
    }

    func progress() -> TerminalProgress { TerminalProgress(json: json, quiet: quiet) }
}

/// Parses a wait time: a number with unit s, m or h, or several (`1h30m`); a bare number is seconds.
func parseWaitDuration(_ text: String) throws -> TimeInterval {
    if let n = Double(text), n >= 0 { return n }
    var total: TimeInterval = 0
    var digits = ""
    for c in text {
        if c.isNumber || c == "." {
            digits.append(c)
            continue
        }
        guard let n = Double(digits), let unit = ["s": 1.0, "m": 60.0, "h": 3600.0][String(c)] else {
            throw CairnError(.usage, "cannot read the duration '\(text)'", hint: "write it like 30s, 5m, 1h or 1h30m")
        }
        total += n * unit
        digits = ""
    }
    guard digits.isEmpty, !text.isEmpty else {
        throw CairnError(.usage, "cannot read the duration '\(text)'", hint: "write it like 30s, 5m, 1h or 1h30m")
    }
    return total
}

/// Installs SIGINT/SIGTERM handlers that cancel the job; a second signal exits at once unless
/// `exitOnRepeat` is false (a job that must clean up, like a running sandbox VM).
func installSignalHandlers(_ token: CancellationToken, exitOnRepeat: Bool = true) -> [any DispatchSourceSignal] {
    var sources: [any DispatchSourceSignal] = []
    for sig in [SIGINT, SIGTERM] {
        signal(sig, SIG_IGN)
        let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        s.setEventHandler {
            if token.isCancelled && exitOnRepeat { Foundation.exit(ExitStatus.interrupted.rawValue) }
            token.cancel()
        }
        s.resume()
        sources.append(s)
    }
    return sources
}

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a repository.")

    @OptionGroup var options: RepositoryOptions

    @Option(help: "none or aes-256-gcm.")
    var encryption = "aes-256-gcm"

    @Option(help: "Chunk size, a power of two from 64K to 8M (default 512K; see docs/FORMAT.md).")
    var chunkSize = "512K"

    @Option(help: "zstd level for new chunks (1-19).")
    var compressionLevel = 3

    func run() throws {
        guard let enc = EncryptionAlgorithm(name: encryption) else {
            throw CairnError(.usage, "unknown encryption '\(encryption)'", hint: "use none or aes-256-gcm")
        }
        guard let size = ByteCount.parse(chunkSize), size <= UInt64(Int.max), RepositoryConfig.validChunkSize(Int(size)) else {
            throw CairnError(.usage, "chunk size '\(chunkSize)' must be a power of two from 64K to 8M")
        }
        guard (1...19).contains(compressionLevel) else { throw CairnError(.usage, "compression level must be 1..19") }
        let path = try options.repositoryPath()
        let pass = enc == .none ? nil : try options.password(confirm: true)
        let repo = try Repository.initialize(path: path, encryption: enc, chunkSize: Int(size), passphrase: pass, compressionLevel: compressionLevel)
        if options.json {
            printJSONLine(["id": repo.config.id, "path": path, "encryption": enc.name, "chunk_size": repo.chunkSize])
        } else {
            print("created repository \(repo.config.id.prefix(8)) at \(path) (encryption \(enc.name), chunk size \(ByteCount.format(UInt64(repo.chunkSize))))")
            if enc != .none { print("keep the password safe: without it the backups cannot be read") }
        }
    }
}
