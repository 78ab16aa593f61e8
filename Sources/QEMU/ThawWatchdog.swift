// The thaw watchdog: a detached process that guarantees a guest Cairn froze through the guest
// agent (GuestAgent.swift) is thawed even if Cairn dies (docs/QMP.md, "Guest agent").
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A separate process that thaws the guest after `seconds` unless cancelled: guarantees thaw
/// even if Cairn is SIGKILLed while the guest is frozen. Spawned detached (setsid, its own
/// process group, stdin/out to /dev/null) as `EXECUTABLE thaw-watchdog --socket PATH --after
/// SECONDS` (EXECUTABLE defaults to /proc/self/exe resolved).
///
/// The intended sequence: spawn the watchdog, freeze, do the point-in-time work, thaw, cancel
/// the watchdog. `seconds` must cover the whole frozen window: a watchdog that fires while
/// Cairn still holds the agent socket waits for that connection to close (one client at a
/// time), and Cairn's own thaw then finds the guest thawed or thaws it, both harmless.
///
/// The child's standard error is /dev/null too: a detached process must not keep the pipes of
/// whoever ran Cairn open (a test runner reading Cairn's output to its end would wait for it).
public final class ThawWatchdog: @unchecked Sendable {
    // @unchecked: `finished` is guarded by `lock`; the rest is immutable.
    public let pid: Int32
    public let agentSocket: String
    private let lock = NSLock()
    private var finished = false

    /// How long `run` keeps trying to reach the agent once its sleep is over.
    package static let retryWindow: Double = 120
    /// The connect-and-resync limit of one attempt (a connection queued behind a dead client's
    /// one is answered as soon as QEMU notices the EOF; a live client's one is waited out).
    package static let attemptTimeout: Double = 5

    private init(pid: Int32, agentSocket: String) {
        self.pid = pid
        self.agentSocket = agentSocket
    }

    /// Starts `EXECUTABLE thaw-watchdog --socket agentSocket --after seconds` in its own session
    /// (setsid), with stdin, stdout and stderr on /dev/null, every other descriptor closed,
    /// the signal mask empty and every signal at its default action.
    public static func spawn(agentSocket: String, after seconds: Double, executable: String? = nil) throws -> ThawWatchdog {
        guard seconds.isFinite, seconds >= 0 else {
            throw CairnError(.usage, "the thaw watchdog's delay must be a finite number of seconds >= 0, not \(seconds)")
        }
        let program = try executable ?? currentExecutable()
        guard access(program, X_OK) == 0 else {
            throw CairnError(.notFound, "the thaw watchdog's executable cannot be run: \(String(cString: strerror(errno)))", path: program)
        }
        let arguments = [program, "thaw-watchdog", "--socket", agentSocket, "--after", formatSeconds(seconds)]

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(spawnSetSID | spawnSetSigMask | spawnSetSigDefault))

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        closeInheritedDescriptors(&actions)

        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, program, &actions, &attributes, argv, environ)
        guard rc == 0 else { throw CairnError.errno("posix_spawn of the thaw watchdog", rc, path: program) }
        return ThawWatchdog(pid: pid, agentSocket: agentSocket)
    }

    /// Kills the watchdog (SIGKILL) and reaps it: call after a successful thaw. Idempotent; a
    /// watchdog that already finished is only reaped. Never signals a process that is no
    /// longer this process's child (its pid may belong to someone else by then).
    public func cancel() {
        lock.lock()
        defer { lock.unlock() }
        guard !finished else { return }
        finished = true
        guard Self.isChildOfThisProcess(pid) else { return }
        kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }

    /// What the child runs: sleep, then connect (retrying until a deadline: the agent socket
    /// accepts one client at a time, so it waits for the dead Cairn's connection to close),
    /// fsfreeze-status, thaw if frozen.
    public static func run(agentSocket: String, after seconds: Double) throws {
        try thawWhenDue(agentSocket: agentSocket, after: seconds)
    }

    /// `run`, reporting what it did: nil when the guest was not frozen, else the number of file
    /// systems thawed.
    @discardableResult
    package static func thawWhenDue(agentSocket: String, after seconds: Double,
                                    retryWindow: Double = retryWindow, attemptTimeout: Double = attemptTimeout) throws -> Int? {
        sleep(seconds: seconds)
        let deadline = MonotonicDeadline(seconds: retryWindow)
        var attempts = 0
        var lastError: (any Error)?
        while true {
            attempts += 1
            do {
                let agent = try GuestAgentClient.connect(path: agentSocket, timeout: max(0.5, min(attemptTimeout, deadline.remaining)))
                defer { agent.close() }
                guard try agent.fsfreezeStatus(timeout: attemptTimeout) == "frozen" else { return nil }
                return try agent.thaw(timeout: 60)
            } catch {
                lastError = error
            }
            if deadline.expired { break }
            sleep(seconds: min(0.2, deadline.remaining))
        }
        throw CairnError(.io, "thaw watchdog: could not thaw the guest within \(QMPClient.seconds(retryWindow)) (\(attempts) attempts); "
                         + "the last error: \(lastError.map { String(describing: $0) } ?? "none")", path: agentSocket,
                         hint: "thaw it by hand (guest-fsfreeze-thaw on the agent socket); is qemu-ga running in the guest on \(GuestAgentClient.channelName)?")
    }

    // MARK: Process plumbing

    // glibc's values (spawn.h); POSIX_SPAWN_SETSID needs _GNU_SOURCE, which Swift's Glibc module lacks.
    private static let spawnSetSigDefault: Int32 = 0x04
    private static let spawnSetSigMask: Int32 = 0x08
    private static let spawnSetSID: Int32 = 0x80

    static func formatSeconds(_ s: Double) -> String {
        s == s.rounded() && s < 1e15 ? String(Int64(s)) : String(s)
    }

    static func sleep(seconds: Double) {
        guard seconds > 0 else { return }
        var request = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }

    /// /proc/self/exe, resolved (the file this process runs, even if run through a symlink).
    static func currentExecutable() throws -> String {
        guard let resolved = realpath("/proc/self/exe", nil) else {
            throw CairnError.errno("realpath", errno, path: "/proc/self/exe")
        }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Every descriptor above 2 closed in the child: posix_spawn_file_actions_addclosefrom_np
    /// (glibc 2.34; found with dlsym since Swift's Glibc module does not declare it), else one
    /// close action per descriptor open now. Cairn's descriptors are mostly close-on-exec
    /// already; this covers the rest (a lock file, a socket), which the watchdog must not hold.
    private static func closeInheritedDescriptors(_ actions: inout posix_spawn_file_actions_t) {
        typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32
        if let handle = dlopen(nil, RTLD_NOW) {
            defer { dlclose(handle) }
            if let symbol = dlsym(handle, "posix_spawn_file_actions_addclosefrom_np"),
               unsafeBitCast(symbol, to: AddCloseFrom.self)(&actions, 3) == 0 {
                return
            }
        }
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for name in open {
            if let fd = Int32(name), fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
        }
    }

    /// Whether `pid` is a process (perhaps a zombie) whose parent is this process, from
    /// /proc/PID/stat ("pid (comm) state ppid ...").
    static func isChildOfThisProcess(_ pid: Int32) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 1, let ppid = Int32(fields[1]) else { return false }
        return ppid == getpid()
    }
}
