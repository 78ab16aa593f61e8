import CairnCore
import Foundation
import Repository
#if canImport(Glibc)
import Glibc
#endif

/// The sandbox's network: none at all, or QEMU user-mode networking with `restrict=on` (the
/// guest gets an address by DHCP but no route to the host or the LAN; only the forwarded
/// ports reach it, from 127.0.0.1).
package enum SandboxNetwork: String, Sendable { case none, user }

/// What proves that the guest came up.
package enum Heartbeat: Sendable {
    /// This text appears on the serial console (a plain substring, not a pattern).
    case serial(String)
    /// The QEMU guest agent answers `guest-sync-delimited` and `guest-ping` on the
    /// `org.qemu.guest_agent.0` virtio-serial channel.
    case agent
    /// A TCP service in the guest accepts connections on this guest port (forwarded to a host
    /// port on 127.0.0.1; needs `network = .user`).
    case tcp(port: Int)
}

extension Heartbeat: CustomStringConvertible {
    package var description: String {
        switch self {
        case .serial(let text): "serial text '\(text)'"
        case .agent: "guest agent ping"
        case .tcp(let port): "guest TCP port \(port)"
        }
    }
}

package struct SandboxOptions: Sendable {
    /// `auto` (kvm when /dev/kvm is usable, else tcg; a kvm boot that fails, by QEMU exiting or
    /// KVM errors on its stderr, is retried once with tcg), `kvm` or `tcg`.
    package var accel = "auto"
    package var memoryMiB = 512
    /// `.none`: `-nic none`. `.user`: `-nic user,restrict=on` plus a host forward of
    /// `forwardPort` (and of a TCP heartbeat port) to 127.0.0.1 on a free port.
    package var network: SandboxNetwork = .none
    /// A guest TCP port reachable from the host (needs `network = .user`).
    package var forwardPort: Int?
    package var heartbeat: Heartbeat = .serial("login:")
    /// Seconds to wait for the heartbeat; also the limit of each test script.
    package var timeout: Double = 120
    /// Shell commands run with `/bin/sh -c` after the heartbeat, with CAIRN_SANDBOX_HOST,
    /// CAIRN_SANDBOX_PORT (the forwarded host port, empty without one) and CAIRN_SNAPSHOT
    /// (the snapshot id) in the environment. A non-zero exit status fails the verification.
    package var testScripts: [String] = []
    /// Temporary files (overlays, sockets, serial log, screenshot). Created if missing and
    /// removed at the end; an existing directory gets a fresh subdirectory instead, which is
    /// removed.
    package var workDir: String
    package var qemu = "qemu-system-x86_64"
    /// Progress lines (which accelerator, fallbacks); nil: silent.
    package var log: (@Sendable (String) -> Void)?

    package init(workDir: String) {
        self.workDir = workDir
    }
}

package struct SandboxOutcome: Sendable {
    package var passed: Bool
    /// What happened, for people: the heartbeat and its time, or what failed and the last
    /// serial lines.
    package var reason: String
    /// From starting QEMU (the attempt that decided) to the heartbeat, or to the failure.
    package var seconds: Double
    /// The accelerator of the attempt that decided: `kvm` or `tcg`.
    package var accel: String
    /// The serial console output (at most the last 4 MiB).
    package var serialLog: [UInt8]
    /// A QMP `screendump` taken before the VM was stopped; nil if QEMU was gone or it failed.
    package var screenshotPNG: [UInt8]?
    /// The host port (on 127.0.0.1) forwarded to the guest's `forwardPort` (or, without one,
    /// to the TCP heartbeat port).
    package var hostPort: Int?

    package init(passed: Bool, reason: String, seconds: Double, accel: String, serialLog: [UInt8] = [],
                 screenshotPNG: [UInt8]? = nil, hostPort: Int? = nil) {
        self.passed = passed
        self.reason = reason
        self.seconds = seconds
        self.accel = accel
        self.serialLog = serialLog
        self.screenshotPNG = screenshotPNG
        self.hostPort = hostPort
    }
}

/// Boots a snapshot in an isolated QEMU VM to prove it starts (docs/SANDBOX.md).
///
/// The snapshot's disks are exported by an in-process `NBDServer` on a unix socket in the work
/// directory, each through a throwaway copy-on-write overlay: the repository is never written.
/// QEMU (q35, `-nodefaults`, no display but a VGA device for screenshots, serial console to a
/// file, a QMP socket, `-no-shutdown`) boots the first disk over virtio-blk. The VM is torn
/// down in every outcome: QMP `quit`, SIGKILL after a grace period, the NBD server stopped,
/// overlays and the work directory removed.
///
/// The caller holds a (shared) repository lock for as long as the sandbox runs.
package final class Sandbox {
    package let repository: Repository
    package let snapshot: SnapshotEntry
    package let options: SandboxOptions

    package init(repository: Repository, snapshot: SnapshotEntry, options: SandboxOptions) {
        self.repository = repository
        self.snapshot = snapshot
        self.options = options
    }

    /// Boot, wait for the heartbeat (or timeout / QEMU exit), run the test scripts, take a QMP
    /// `screendump` and keep the serial log, then tear down. Throws for setup errors (bad
    /// options, QEMU missing, repository errors) and `.interrupted` when `cancel` fires; a
    /// guest that does not come up is a failed outcome, not an error.
    package func verify(cancel: CancellationToken) throws -> SandboxOutcome {
        try run(cancel: cancel, kept: nil)
    }

    /// Boot and wait for the heartbeat, call `ready`, then keep the VM running until `cancel`
    /// (SIGINT/SIGTERM) or the guest powers off; then tear down. `ready` is not called when
    /// the heartbeat fails (the outcome says why).
    package func runKept(cancel: CancellationToken, ready: (SandboxOutcome) -> Void) throws -> SandboxOutcome {
        try withoutActuallyEscaping(ready) { try run(cancel: cancel, kept: $0) }
    }

    // MARK: - The run

    private func run(cancel: CancellationToken, kept: ((SandboxOutcome) -> Void)?) throws -> SandboxOutcome {
        let plan = try SandboxPlan(options: options, snapshot: snapshot)
        let work = try SandboxWorkDirectory(requested: options.workDir)
        defer { work.remove() }

        var notes: [String] = []
        for (attempt, accel) in plan.accelerators.enumerated() {
            let last = attempt == plan.accelerators.count - 1
            options.log?("booting snapshot \(snapshot.id.short) with \(accel)")
            let machine = try SandboxMachine.start(repository: repository, snapshot: snapshot, plan: plan, accel: accel,
                                                   work: work, attempt: attempt)
            defer { machine.tearDown() }
            let waited = machine.waitForHeartbeat(plan.heartbeat, timeout: options.timeout, cancel: cancel)
            if case .cancelled = waited {
                if kept == nil { throw CairnError(.interrupted, "interrupted while booting snapshot \(snapshot.id.short)") }
            }
            if accel == "kvm" && !last, let why = waited.kvmFailure {
                let note = "kvm failed (\(why)); retried with tcg"
                options.log?(note)
                notes.append(note)
                continue
            }
            let outcome = finish(machine, waited: waited, accel: accel, notes: notes, cancel: cancel, kept: kept)
            if kept == nil && cancel.isCancelled {
                throw CairnError(.interrupted, "interrupted while checking snapshot \(snapshot.id.short)")
            }
            return outcome
        }
        // Not reached: the last attempt always returns.
        throw CairnError(.io, "no accelerator to boot with")
    }

    /// After the heartbeat wait: test scripts or the kept run, evidence, the outcome.
    private func finish(_ machine: SandboxMachine, waited: HeartbeatResult, accel: String, notes: [String],
                        cancel: CancellationToken, kept: ((SandboxOutcome) -> Void)?) -> SandboxOutcome {
        var outcome = SandboxOutcome(passed: false, reason: "", seconds: machine.elapsed, accel: accel, hostPort: machine.primaryHostPort)
        guard case .heartbeat(let seconds) = waited else {
            outcome.reason = machine.describeFailure(waited, timeout: options.timeout)
            outcome.reason += notes.map { "; \($0)" }.joined()
            outcome.screenshotPNG = machine.screenshot()
            outcome.serialLog = machine.serialLog()
            return outcome
        }
        outcome.seconds = seconds
        outcome.passed = true
        outcome.reason = "heartbeat (\(options.heartbeat)) after \(String(format: "%.1f", seconds)) s with \(accel)"
            + notes.map { "; \($0)" }.joined()
        if let kept {
            outcome.serialLog = machine.serialLog()
            kept(outcome)
            let end = machine.keepRunning(cancel: cancel)
            outcome.reason += "; \(end)"
        } else if !options.testScripts.isEmpty {
            let env = ["CAIRN_SANDBOX_HOST": "127.0.0.1", "CAIRN_SANDBOX_PORT": machine.primaryHostPort.map(String.init) ?? "",
                       "CAIRN_SNAPSHOT": snapshot.id.hex]
            for (i, script) in options.testScripts.enumerated() {
                if let failure = machine.runTestScript(script, number: i + 1, environment: env, timeout: options.timeout, cancel: cancel) {
                    outcome.passed = false
                    outcome.reason += "; " + failure
                    break
                }
            }
            if outcome.passed {
                outcome.reason += "; \(options.testScripts.count) test script\(options.testScripts.count == 1 ? "" : "s") passed"
            }
        }
        outcome.screenshotPNG = machine.screenshot()
        outcome.serialLog = machine.serialLog()
        return outcome
    }
}

/// The checked options of one sandbox run.
struct SandboxPlan {
    let options: SandboxOptions
    let snapshot: SnapshotEntry
    let qemuPath: String
    let accelerators: [String]
    let heartbeat: Heartbeat
    /// Guest TCP ports to forward from 127.0.0.1.
    let guestPorts: [Int]

    init(options: SandboxOptions, snapshot: SnapshotEntry) throws {
        self.options = options
        self.snapshot = snapshot
        guard !snapshot.manifest.disks.isEmpty else { throw CairnError(.usage, "snapshot \(snapshot.id.short) has no disks to boot") }
        guard options.memoryMiB >= 16 else { throw CairnError(.usage, "the sandbox needs at least 16 MiB of memory (got \(options.memoryMiB))") }
        guard options.timeout > 0 else { throw CairnError(.usage, "the heartbeat timeout must be positive") }
        switch options.accel {
        case "auto": accelerators = SandboxHost.kvmUsable() ? ["kvm", "tcg"] : ["tcg"]
        case "kvm", "tcg": accelerators = [options.accel]
        default: throw CairnError(.usage, "unknown accelerator '\(options.accel)'", hint: "use auto, kvm or tcg")
        }
        var ports: [Int] = []
        if let p = options.forwardPort { ports.append(p) }
        if case .tcp(let p) = options.heartbeat, !ports.contains(p) { ports.append(p) }
        for p in ports where !(1...65535).contains(p) {
            throw CairnError(.usage, "guest port \(p) is not a TCP port number")
        }
        if !ports.isEmpty && options.network != .user {
            throw CairnError(.usage, "forwarding guest port \(ports[0]) needs the user network", hint: "use network user (--network user)")
        }
        if case .serial(let text) = options.heartbeat, text.isEmpty {
            throw CairnError(.usage, "the serial heartbeat text is empty")
        }
        guestPorts = ports
        heartbeat = options.heartbeat
        qemuPath = try findExecutable(options.qemu)
    }
}

/// The sandbox's private directory: created (or a fresh subdirectory of an existing one),
/// removed at the end. Unix socket paths must be short (108 bytes): when the directory's path
/// is too long, the sockets go to a short directory under /tmp, removed too.
final class SandboxWorkDirectory {
    let path: String
    let socketDirectory: String
    private let removeSocketDirectory: Bool

    init(requested: String) throws {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        let requested = requested.hasPrefix("/") ? requested : (fm.currentDirectoryPath as NSString).appendingPathComponent(requested)
        if fm.fileExists(atPath: requested, isDirectory: &isDir) {
            guard isDir.boolValue else { throw CairnError(.usage, "the sandbox work directory is a file", path: requested) }
            path = try Self.makeTemporary(in: requested)
        } else {
            do {
                try fm.createDirectory(atPath: requested, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw CairnError(.io, "cannot create the sandbox work directory: \(error.localizedDescription)", path: requested)
            }
            path = requested
        }
        if (path as NSString).appendingPathComponent("qga.sock").utf8.count < 100 {
            socketDirectory = path
            removeSocketDirectory = false
        } else {
            do {
                socketDirectory = try Self.makeTemporary(in: "/tmp")
            } catch {
                try? fm.removeItem(atPath: path)
                throw error
            }
            removeSocketDirectory = true
        }
    }

    func file(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }
    func socket(_ name: String) -> String { (socketDirectory as NSString).appendingPathComponent(name) }

    func remove() {
        try? FileManager.default.removeItem(atPath: path)
        if removeSocketDirectory { try? FileManager.default.removeItem(atPath: socketDirectory) }
    }

    private static func makeTemporary(in parent: String) throws -> String {
        var template = Array((parent as NSString).appendingPathComponent("cairn-sandbox-XXXXXX").utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw CairnError.errno("mkdtemp", errno, path: parent) }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Facts about this host.
package enum SandboxHost {
    /// Whether KVM can be used: /dev/kvm opens read-write.
    package static func kvmUsable() -> Bool {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }
}

/// `name` if it is a path, else the first match on $PATH.
package func findExecutable(_ name: String) throws -> String {
    if name.contains("/") {
        guard access(name, X_OK) == 0 else { throw CairnError(.notFound, "\(name) is not an executable file", path: name) }
        return name
    }
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let p = "\(dir)/\(name)"
        if access(p, X_OK) == 0 { return p }
    }
    throw CairnError(.notFound, "\(name) is not installed", hint: "install the Debian package qemu-system-x86")
}
