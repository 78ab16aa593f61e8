/// The one error type that crosses Cairn's layers.
///
/// Every error says *what* went wrong, *where* (a path, a byte offset, an object id) and,
/// where we know it, *what to do*. The command-line tool maps `code` to an exit status.
public struct CairnError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The command line or an argument is wrong.
        case usage
        /// A file, snapshot or disk named by the user does not exist.
        case notFound
        /// The repository does not exist or is not a Cairn repository.
        case repositoryNotFound
        /// The passphrase does not open any key of the repository.
        case wrongPassword
        /// Stored data failed a digest, authentication or structure check.
        case corrupt
        /// A disk image is malformed (bad header, table offsets out of range, loops).
        case malformedImage
        /// The input uses a feature Cairn does not implement.
        case unsupported
        /// An operating-system call failed.
        case io
        /// Another process holds a conflicting lock.
        case locked
        /// The storage is full.
        case noSpace
        /// The job was interrupted by a signal.
        case interrupted
    }

    public var code: Code
    public var message: String
    public var path: String?
    public var offset: UInt64?
    public var hint: String?

    public init(_ code: Code, _ message: String, path: String? = nil, offset: UInt64? = nil, hint: String? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.hint = hint
    }

    public var description: String {
        var s = message
        if let path { s = "\(path): " + s }
        if let offset { s += " (at byte offset \(offset))" }
        if let hint { s += "; " + hint }
        return s
    }
}

extension CairnError {
    /// An I/O error from `errno`, naming the call and the path.
    public static func errno(_ call: String, _ err: Int32, path: String?, offset: UInt64? = nil) -> CairnError {
        let text = String(cString: strerror(err))
        let code: Code = (err == ENOSPC || err == EDQUOT) ? .noSpace : (err == ENOENT ? .notFound : .io)
        var hint: String?
        if code == .noSpace { hint = "free space on the target file system and run the job again; nothing already stored is lost" }
        return CairnError(code, "\(call) failed: \(text) (errno \(err))", path: path, offset: offset, hint: hint)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
