import CairnCore
import Foundation
import NBDServer
import QEMU
import Repository
#if canImport(Glibc)
import Glibc
#endif

/// How waiting for the heartbeat ended.
enum HeartbeatResult {
    case heartbeat(seconds: Double)
    case timedOut
    case qemuExited(status: Int32, stderr: String)
    /// KVM errors on QEMU's stderr (the VM is stopped).
    case kvmError(String)
    /// The guest powered itself off (QEMU runs with -no-shutdown, so it is still there).
    case poweredOff
    /// The VM stopped in another run state (internal-error, guest-panicked, io-error...).
    case stopped(String)
    case cancelled

    /// Why a kvm attempt failed in a way worth retrying with tcg; nil otherwise.
    var kvmFailure: String? {
        switch self {
        case .qemuExited(let status, let stderr): "QEMU exited with status \(status)" + (stderr.isEmpty ? "" : ": \(stderr)")
        case .kvmError(let text): text
        case .stopped("internal-error"): "the VM stopped with an internal error"
        default: nil
        }
    }
}

/// One QEMU run of a sandbox: the NBD exports with fresh overlays, the QEMU process, its QMP
/// connection, and the heartbeat probes. `tearDown` undoes all of it (idempotent).
final class SandboxMachine {
    let plan: SandboxPlan
    let accel: String
    let work: SandboxWorkDirectory
    let started: Date
    /// Guest port -> host port on 127.0.0.1.
    let hostPorts: [Int: Int]
    private let exports: ExportSet
    private let server: NBDServer
    let process: Process
    private let overlayDirectory: String
    private let nbdSocket: String
    private let qmpSocket: String
    private let agentSocket: String
    let serialPath: String
    let stderrPath: String
    let screenshotPath: String
    var qmp: QMPClient?
    private var agent: GuestAgentClient?
    private var serialReadOffset: UInt64 = 0
    private var serialTail: [UInt8] = []
    private var tornDown = false

    var elapsed: Double { Date().timeIntervalSince(started) }

    /// The host port of `forwardPort`, else of the TCP heartbeat port.
    var primaryHostPort: Int? {
        plan.guestPorts.first.flatMap { hostPorts[$0] }
    }

    private init(plan: SandboxPlan, accel: String, work: SandboxWorkDirectory, exports: ExportSet, server: NBDServer,
                 process: Process, qmp: QMPClient?, hostPorts: [Int: Int], paths: Paths, started: Date) {
        self.plan = plan
        self.accel = accel
        self.work = work
        self.exports = exports
        self.server = server
        self.process = process
        self.hostPorts = hostPorts
        self.overlayDirectory = paths.overlays
        self.nbdSocket = paths.nbd
        self.qmpSocket = paths.qmp
        self.agentSocket = paths.agent
        self.serialPath = paths.serial
        self.stderrPath = paths.stderr
        self.screenshotPath = paths.screenshot
        self.qmp = qmp
        self.started = started
    }

    deinit { tearDown() }

    struct Paths {
        var overlays, nbd, qmp, agent, serial, stderr, screenshot: String
        init(work: SandboxWorkDirectory, attempt: Int) {
            overlays = work.file("overlays-\(attempt)")
            nbd = work.socket("nbd-\(attempt).sock")
            qmp = work.socket("qmp-\(attempt).sock")
            agent = work.socket("qga-\(attempt).sock")
            serial = work.file("serial-\(attempt).log")
            stderr = work.file("qemu-\(attempt).stderr")
            screenshot = work.file("screen-\(attempt).png")
        }
    }

    // MARK: - Start

    /// Exports the snapshot (fresh overlays), starts QEMU and connects to its QMP socket. A
    /// QEMU that exits at once is not an error here: the heartbeat wait reports it.
    static func start(repository: Repository, snapshot: SnapshotEntry, plan: SandboxPlan, accel: String,
                      work: SandboxWorkDirectory, attempt: Int) throws -> SandboxMachine {
        let paths = Paths(work: work, attempt: attempt)
        let exports = try ExportSet.make(repository: repository, snapshots: [snapshot], writable: true, overlayDirectory: paths.overlays)
        let server = NBDServer(exports: exports.exports)
        do {
            try server.listen(unixSocket: paths.nbd)
        } catch {
            server.shutdown()
            exports.removeOverlays()
            throw error
        }
        // A free host port can be taken by someone else before QEMU binds it: then QEMU exits
        // at once ("Could not set up host forwarding rule") and we try other ports.
        // A QEMU built without seccomp refuses -sandbox: then it runs without.
        var tries = 0
        var seccomp = true
        while true {
            tries += 1
            var hostPorts: [Int: Int] = [:]
            for p in plan.guestPorts { hostPorts[p] = try freeLoopbackPort() }
            let args = arguments(plan: plan, accel: accel, paths: paths, exports: exports, hostPorts: hostPorts, seccomp: seccomp)
            let process: Process
            do {
                process = try launch(plan.qemuPath, args, stderrPath: paths.stderr)
            } catch {
                server.shutdown()
                exports.removeOverlays()
                throw error
            }
            let started = Date()
            let qmp = connectMonitor(process, path: paths.qmp)
            if !process.isRunning, tries < 4 {
                let stderr = readStderr(paths.stderr)
                let portTaken = !hostPorts.isEmpty && stderr.contains("host forwarding")
                let noSeccomp = seccomp && stderr.contains("seccomp")
                if portTaken || noSeccomp {
                    if noSeccomp {
                        seccomp = false
                        plan.options.log?("this QEMU has no seccomp support: running it without -sandbox")
                    }
                    process.waitUntilExit()
                    qmp?.close()
                    continue
                }
            }
            return SandboxMachine(plan: plan, accel: accel, work: work, exports: exports, server: server, process: process,
                                  qmp: qmp, hostPorts: hostPorts, paths: paths, started: started)
        }
    }

    /// QEMU's command line.
    static func arguments(plan: SandboxPlan, accel: String, paths: Paths, exports: ExportSet, hostPorts: [Int: Int], seccomp: Bool) -> [String] {
        let o = plan.options
        var args = ["-name", "cairn-sandbox-\(plan.snapshot.id.short)",
                    "-accel", accel, "-cpu", accel == "kvm" ? "host" : "max",
                    "-machine", "q35", "-m", "\(o.memoryMiB)",
                    "-nodefaults", "-no-user-config", "-no-shutdown"]
        if seccomp {
            // QEMU's own seccomp filter: no new processes, no privilege changes.
            args += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        }
        args += ["-display", "none", "-device", "VGA",
                    "-chardev", "file,id=serial0,path=\(escape(paths.serial))", "-serial", "chardev:serial0",
                    "-chardev", "socket,id=qmp0,path=\(escape(paths.qmp)),server=on,wait=off", "-mon", "chardev=qmp0,mode=control"]
        switch o.network {
        case .none:
            args += ["-nic", "none"]
        case .user:
            var netdev = "user,id=net0,restrict=on"
            for guest in plan.guestPorts {
                if let host = hostPorts[guest] { netdev += ",hostfwd=tcp:127.0.0.1:\(host)-:\(guest)" }
            }
            args += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
        }
        if case .agent = plan.heartbeat {
            args += ["-chardev", "socket,id=qga0,path=\(escape(paths.agent)),server=on,wait=off",
                     "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        }
        for (i, d) in exports.descriptions.enumerated() {
            args += ["-blockdev", "driver=nbd,node-name=disk\(i),server.type=unix,server.path=\(escape(paths.nbd)),export=\(escape(d.name))",
                     "-device", "virtio-blk-pci,drive=disk\(i)" + (i == 0 ? ",bootindex=0" : "")]
        }
        return args
    }

    /// A QEMU option value: commas doubled.
    private static func escape(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }

    private static func launch(_ path: String, _ args: [String], stderrPath: String) throws -> Process {
        guard FileManager.default.createFile(atPath: stderrPath, contents: nil), let err = FileHandle(forWritingAtPath: stderrPath) else {
            throw CairnError(.io, "cannot create QEMU's stderr file", path: stderrPath)
        }
        defer { try? err.close() }
        let p = Process()
        // Through setpriv (util-linux) when there is one: QEMU gets SIGKILL when this thread
        // dies, so a killed Cairn leaves no VM behind.
        if let setpriv = try? findExecutable("setpriv") {
            p.executableURL = URL(fileURLWithPath: setpriv)
            p.arguments = ["--pdeathsig", "KILL", "--", path] + args
        } else {
            p.executableURL = URL(fileURLWithPath: path)
            p.arguments = args
        }
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = err
        do {
            try p.run()
        } catch {
            throw CairnError(.io, "cannot start QEMU: \(error.localizedDescription)", path: path)
        }
        return p
    }

    /// Connects to QMP while QEMU starts (up to 30 s); nil if QEMU exits first.
    private static func connectMonitor(_ process: Process, path: String) -> QMPClient? {
        let deadline = Date().addingTimeInterval(30)
        while process.isRunning && Date() < deadline {
            if let client = try? QMPClient.connect(path: path, timeout: 1, commandTimeout: 10) { return client }
        }
        return nil
    }

    // MARK: - Waiting

    func waitForHeartbeat(_ heartbeat: Heartbeat, timeout: Double, cancel: CancellationToken) -> HeartbeatResult {
        let deadline = started.addingTimeInterval(timeout)
        var nextStatus = Date()
        var nextProbe = Date()
        while true {
            if cancel.isCancelled { return .cancelled }
            if !process.isRunning {
                process.waitUntilExit()
                return .qemuExited(status: process.terminationStatus, stderr: stderrTail())
            }
            if accel == "kvm", let kvm = kvmErrorOnStderr() { return .kvmError(kvm) }
            switch heartbeat {
            case .serial(let text):
                if serialContains(Array(text.utf8)) { return .heartbeat(seconds: elapsed) }
            case .agent:
                if Date() >= nextProbe {
                    nextProbe = Date().addingTimeInterval(1)
                    if agentAnswers(within: min(2, max(0.2, deadline.timeIntervalSinceNow))) { return .heartbeat(seconds: elapsed) }
                }
            case .tcp(let port):
                if Date() >= nextProbe, let host = hostPorts[port] {
                    nextProbe = Date().addingTimeInterval(1)
                    if tcpAnswers(hostPort: host, guestPort: port) { return .heartbeat(seconds: elapsed) }
                }
            }
            if Date() >= nextStatus {
                nextStatus = Date().addingTimeInterval(0.5)
                if let status = runState() {
                    switch status {
                    case "running", "prelaunch", "inmigrate", "paused", "debug", "suspended", "restore-vm", "save-vm", "finish-migrate", "postmigrate":
                        break
                    case "shutdown": return .poweredOff
                    default: return .stopped(status)
                    }
                }
            }
            if Date() >= deadline { return .timedOut }
            usleep(100_000)
        }
    }

    /// After the heartbeat of a kept sandbox: runs until `cancel`, QEMU exits or the guest
    /// powers off; says which.
    func keepRunning(cancel: CancellationToken) -> String {
        let from = Date()
        var nextStatus = Date()
        while true {
            if cancel.isCancelled { return "stopped by an interrupt after \(Int(Date().timeIntervalSince(from))) s" }
            if !process.isRunning {
                process.waitUntilExit()
                return "QEMU exited with status \(process.terminationStatus)" + (stderrTail().isEmpty ? "" : ": \(stderrTail())")
            }
            if Date() >= nextStatus {
                nextStatus = Date().addingTimeInterval(0.5)
                if let s = runState() {
                    if s == "shutdown" { return "the guest powered off after \(Int(Date().timeIntervalSince(from))) s" }
                    if s == "internal-error" || s == "guest-panicked" || s == "io-error" { return "the VM stopped (\(s))" }
                }
            }
            usleep(100_000)
        }
    }

    /// The VM's run state from QMP `query-status`; nil when QMP does not answer.
    private func runState() -> String? {
        guard let qmp, qmp.isConnected else { return nil }
        guard let reply = try? qmp.execute("query-status", timeout: 5) as? [String: Any] else { return nil }
        return reply["status"] as? String
    }

    // MARK: - Heartbeat probes

    /// Whether `needle` has appeared on the serial console (reads only what is new).
    private func serialContains(_ needle: [UInt8]) -> Bool {
        guard let f = try? PosixFile(path: serialPath, flags: O_RDONLY | O_CLOEXEC) else { return false }
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = (try? chunk.withUnsafeMutableBytes { try f.preadSome(into: $0, at: serialReadOffset) }) ?? 0
            if n <= 0 { break }
            serialReadOffset += UInt64(n)
            serialTail += chunk[0..<n]
            if serialTail.count >= needle.count, containsBytes(serialTail, needle) {
                return true
            }
            // Keep only what could still be the start of a match.
            if serialTail.count > needle.count { serialTail.removeFirst(serialTail.count - needle.count + 1) }
        }
        return false
    }

    /// The guest agent resyncs (guest-sync-delimited) and answers guest-ping within `seconds`.
    /// A silent or broken connection is dropped and made anew at the next poll (the resync
    /// skips whatever an earlier connection left in the channel).
    private func agentAnswers(within seconds: Double) -> Bool {
        do {
            let client = try agent ?? GuestAgentClient.connect(path: agentSocket, timeout: seconds)
            agent = client
            try client.ping(timeout: seconds)
            return true
        } catch {
            agent?.close()
            agent = nil
            return false
        }
    }

    private func tcpAnswers(hostPort: Int, guestPort: Int) -> Bool {
        TCPServiceProbe.answers(hostPort: hostPort, guestPort: guestPort) { [qmp] in
            guard let qmp, qmp.isConnected else { return nil }
            return try? qmp.execute("human-monitor-command", arguments: ["command-line": "info usernet"], timeout: 5) as? String
        }
    }

    private func kvmErrorOnStderr() -> String? {
        let text = stderrText()
        for marker in ["KVM internal error", "kvm run failed", "KVM: entry failed", "emulation failure", "failed to initialize kvm",
                       "Failed to initialize KVM", "KVM: injection failed"] where text.contains(marker) {
            return stderrTail()
        }
        return nil
    }

    // MARK: - Teardown

    /// QMP `quit`, SIGKILL if QEMU is still there after a grace period; NBD server stopped;
    /// overlays and sockets removed. Idempotent.
    func tearDown() {
        if tornDown { return }
        tornDown = true
        stopQEMU()
        agent?.close()
        agent = nil
        server.shutdown()
        exports.removeOverlays()
        try? FileManager.default.removeItem(atPath: overlayDirectory)
        for s in [nbdSocket, qmpSocket, agentSocket] { unlink(s) }
    }

    private func stopQEMU() {
        if process.isRunning, let qmp, qmp.isConnected {
            _ = try? qmp.execute("quit", timeout: 2)
            let grace = Date().addingTimeInterval(3)
            while process.isRunning && Date() < grace { usleep(20_000) }
        }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        qmp?.close()
        qmp = nil
    }
}

func formatSeconds(_ s: Double) -> String {
    s == s.rounded() ? "\(Int(s)) s" : String(format: "%.1f s", s)
}

func containsBytes(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard !needle.isEmpty, haystack.count >= needle.count else { return needle.isEmpty }
    let first = needle[0]
    var i = 0
    let last = haystack.count - needle.count
    while i <= last {
        if haystack[i] == first && haystack[i..<(i + needle.count)].elementsEqual(needle) { return true }
        i += 1
    }
    return false
}

/// A free TCP port on 127.0.0.1 (bound, read back, released).
func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw CairnError.errno("socket", errno, path: nil) }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    guard bound == 0 else { throw CairnError.errno("bind 127.0.0.1:0", errno, path: nil) }
    let named = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    guard named == 0 else { throw CairnError.errno("getsockname", errno, path: nil) }
    return Int(UInt16(bigEndian: addr.sin_port))
}
