import ArgumentParser
import CairnCore
import Engine
import Foundation
#if canImport(Glibc)
import Glibc
#endif

struct SandboxCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox",
        abstract: "Boot a snapshot in an isolated VM: check that it comes up, or keep it running for item recovery.",
        discussion: """
        The snapshot's disks are served from the repository with throwaway copy-on-write \
        overlays (the repository is never written) and booted under qemu-system-x86_64 with no \
        network (--network none, the default) or a user-mode network with no route to the host \
        or the LAN (--network user). Success is a heartbeat: a text on the serial console \
        (--heartbeat-serial, default 'login:'), the guest agent answering (--heartbeat-agent), \
        or a guest TCP port answering (--heartbeat-port).

        Without --keep: one boot check, then the VM is destroyed; exit status 0 when it passed, \
        3 when it did not. With --keep: once the heartbeat is seen the VM keeps running (with \
        --forward PORT reachable at the printed 127.0.0.1 port) until Ctrl-C or SIGTERM, or \
        until the guest powers off; then the overlays are discarded. See docs/SANDBOX.md.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Argument(help: "Snapshot (id, prefix or 'latest').")
    var snapshot: String

    @Flag(help: "Keep the VM running after the heartbeat until interrupted.")
    var keep = false

    @OptionGroup(title: "Sandbox") var boot: SandboxBootOptions

    @Option(help: ArgumentHelp("Write the evidence (screenshot.png, serial.log) into this directory.", valueName: "dir"))
    var evidence: String?

    @Option(help: ArgumentHelp("Directory for the overlays, sockets and serial log while the VM runs (default: a new directory under $TMPDIR); removed at the end.", valueName: "dir"))
    var workDir: String?

    @Option(help: "Path of qemu-system-x86_64.")
    var qemu = "qemu-system-x86_64"

    func validate() throws {
        if keep && !boot.testScripts.isEmpty { throw ValidationError("--test-script runs only in a boot check (without --keep)") }
    }

    func run() throws {
        let repo = try options.open()
        // Shared: gc cannot delete the chunks the VM reads.
        let lock = try repo.lock(exclusive: false, job: "sandbox")
        defer { lock.release() }
        let snap = try repo.resolveSnapshot(snapshot, vm: vm, codec: repo.makeCodec())
        let dir = workDir ?? (NSTemporaryDirectory() as NSString).appendingPathComponent("cairn-sandbox-\(snap.id.short)-\(UUID().uuidString.prefix(8))")
        var opts = try boot.sandboxOptions(workDir: dir, quiet: options.quiet || options.json)
        opts.qemu = qemu
        let sandbox = Sandbox(repository: repo, snapshot: snap, options: opts)
        let cancel = CancellationToken()
        // Every signal only cancels: the VM must be torn down before we exit.
        let signals = installSignalHandlers(cancel, exitOnRepeat: false)
        defer { signals.forEach { $0.cancel() } }

        let outcome: SandboxOutcome
        if keep {
            outcome = try sandbox.runKept(cancel: cancel) { ready in
                announce(ready, options: opts, snapshot: snap.id.short)
            }
        } else {
            outcome = try sandbox.verify(cancel: cancel)
        }
        try saveEvidence(outcome)
        report(outcome, kept: keep)
        if keep {
            if !outcome.passed && cancel.isCancelled { throw CairnError(.interrupted, "interrupted before snapshot \(snap.id.short) came up") }
            if !outcome.passed { throw CairnError(.io, "snapshot \(snap.id.short) did not come up: \(outcome.reason)") }
        } else if !outcome.passed {
            throw ExitCode(ExitStatus.corruption.rawValue)
        }
    }

    /// The kept VM is up: where to reach it.
    private func announce(_ ready: SandboxOutcome, options o: SandboxOptions, snapshot short: String) {
        let guestPort = o.forwardPort ?? { if case .tcp(let p) = o.heartbeat { return p } else { return nil } }()
        if options.json {
            var obj: [String: Any] = ["type": "ready", "snapshot": short, "seconds": ready.seconds, "accel": ready.accel, "reason": ready.reason]
            if let h = ready.hostPort, let g = guestPort {
                obj["host"] = "127.0.0.1"
                obj["host_port"] = h
                obj["guest_port"] = g
            }
            printJSONLine(obj)
        } else {
            print("sandbox of snapshot \(short) is up: \(ready.reason)")
            if let h = ready.hostPort, let g = guestPort { print("forward: 127.0.0.1:\(h) -> guest port \(g)") }
            print("running; interrupt (Ctrl-C) to stop it and discard its overlay")
        }
        fflush(nil)
    }

    private func report(_ outcome: SandboxOutcome, kept: Bool) {
        if options.json {
            var obj: [String: Any] = ["type": "result", "passed": outcome.passed, "reason": outcome.reason, "seconds": outcome.seconds,
                                      "accel": outcome.accel, "serial_bytes": outcome.serialLog.count,
                                      "screenshot_bytes": outcome.screenshotPNG?.count ?? 0]
            if let h = outcome.hostPort { obj["host_port"] = h }
            printJSONLine(obj)
        } else if kept {
            printError("cairn: sandbox stopped (\(outcome.reason)); overlay discarded")
        } else {
            print(outcome.passed ? "boot check passed: \(outcome.reason)" : "boot check FAILED: \(outcome.reason)")
        }
    }

    private func saveEvidence(_ outcome: SandboxOutcome) throws {
        guard let evidence else { return }
        try FileManager.default.createDirectory(atPath: evidence, withIntermediateDirectories: true)
        let serial = (evidence as NSString).appendingPathComponent("serial.log")
        guard FileManager.default.createFile(atPath: serial, contents: Data(outcome.serialLog)) else {
            throw CairnError(.io, "cannot write the serial log", path: serial)
        }
        if let png = outcome.screenshotPNG {
            let path = (evidence as NSString).appendingPathComponent("screenshot.png")
            guard FileManager.default.createFile(atPath: path, contents: Data(png)) else {
                throw CairnError(.io, "cannot write the screenshot", path: path)
            }
        }
    }
}

/// The options of a sandbox boot, shared by `cairn sandbox` and `cairn verify --level boot`.
struct SandboxBootOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Forward this guest TCP port to a free port on 127.0.0.1 (needs --network user, the default with it).", valueName: "port"))
    var forward: Int?

    @Option(help: ArgumentHelp("none (no network device) or user (user-mode network, restricted: no route to the host or the LAN).",
                               valueName: "none|user"))
    var network: String?

    @Option(help: "auto (kvm when usable, falling back to tcg), kvm or tcg.")
    var accel = "auto"

    @Option(help: "Guest memory in MiB.")
    var memory = 512

    @Option(help: ArgumentHelp("Heartbeat: this text on the serial console (default 'login:').", valueName: "text"))
    var heartbeatSerial: String?

    @Flag(help: "Heartbeat: the QEMU guest agent answers guest-ping.")
    var heartbeatAgent = false

    @Option(help: ArgumentHelp("Heartbeat: this guest TCP port answers (forwarded; needs --network user, the default with it).", valueName: "port"))
    var heartbeatPort: Int?

    @Option(name: .customLong("boot-timeout"), help: "How long to wait for the heartbeat (e.g. 90, 2m); also the limit of each test script.")
    var timeout = "120"

    @Option(name: .customLong("test-script"), help: ArgumentHelp("A shell command run after the heartbeat (repeatable); environment CAIRN_SANDBOX_HOST, CAIRN_SANDBOX_PORT, CAIRN_SNAPSHOT; non-zero exit fails the check.", valueName: "command"))
    var testScripts: [String] = []

    func validate() throws {
        let heartbeats = (heartbeatSerial != nil ? 1 : 0) + (heartbeatAgent ? 1 : 0) + (heartbeatPort != nil ? 1 : 0)
        if heartbeats > 1 { throw ValidationError("give one of --heartbeat-serial, --heartbeat-agent, --heartbeat-port") }
        if let network, SandboxNetwork(rawValue: network) == nil { throw ValidationError("--network must be none or user") }
        if network == "none" && (forward != nil || heartbeatPort != nil) {
            throw ValidationError("--forward and --heartbeat-port need --network user")
        }
        for p in [forward, heartbeatPort].compactMap({ $0 }) where !(1...65535).contains(p) {
            throw ValidationError("port \(p) is not a TCP port number")
        }
        if !["auto", "kvm", "tcg"].contains(accel) { throw ValidationError("--accel must be auto, kvm or tcg") }
        if memory < 16 { throw ValidationError("--memory must be at least 16 (MiB)") }
    }

    func sandboxOptions(workDir: String, quiet: Bool) throws -> SandboxOptions {
        var o = SandboxOptions(workDir: workDir)
        o.accel = accel
        o.memoryMiB = memory
        o.forwardPort = forward
        o.network = network.flatMap { SandboxNetwork(rawValue: $0) } ?? (forward != nil || heartbeatPort != nil ? .user : .none)
        if let heartbeatSerial { o.heartbeat = .serial(heartbeatSerial) }
        if heartbeatAgent { o.heartbeat = .agent }
        if let heartbeatPort { o.heartbeat = .tcp(port: heartbeatPort) }
        o.timeout = try parseWaitDuration(timeout)
        guard o.timeout > 0 else { throw CairnError(.usage, "--boot-timeout must be positive") }
        o.testScripts = testScripts
        o.log = { line in if !quiet { printError("cairn: \(line)") } }
        return o
    }
}
