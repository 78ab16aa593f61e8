/// Progress of a job, reported by the engine and drawn by the command-line tool.
public struct ProgressSnapshot: Sendable {
    public var phase: String
    /// Bytes of the virtual disks processed so far (read, skipped as zero, or reused).
    public var doneBytes: UInt64
    public var totalBytes: UInt64
    /// Bytes actually read from the sources.
    public var readBytes: UInt64
    /// Bytes of chunks newly stored (before compression).
    public var newBytes: UInt64
    public var elapsedSeconds: Double

    public init(phase: String, doneBytes: UInt64, totalBytes: UInt64, readBytes: UInt64 = 0, newBytes: UInt64 = 0, elapsedSeconds: Double) {
        self.phase = phase
        self.doneBytes = doneBytes
        self.totalBytes = totalBytes
        self.readBytes = readBytes
        self.newBytes = newBytes
        self.elapsedSeconds = elapsedSeconds
    }
}

/// Receives progress; called from any thread, at most a few times a second.
public protocol ProgressReporter: Sendable {
    func report(_ progress: ProgressSnapshot)
    func finish(_ progress: ProgressSnapshot)
}

/// A reporter that says nothing.
public struct SilentProgress: ProgressReporter {
    public init() {}
    public func report(_ progress: ProgressSnapshot) {}
    public func finish(_ progress: ProgressSnapshot) {}
}
