import Foundation

/// A value computed on another thread while the caller goes on; `get()` waits for it.
///
/// For work that overlaps a job's main phase (listing a big repository's chunks while QEMU
/// sets up, walking a guest's file tree while its data is read). The caller must `get()` (or
/// `wait()`) before anything the work reads goes away.
final class Background<T: Sendable>: @unchecked Sendable {
    // @unchecked: `result` is written once before `done` is left and read only after waiting.
    private let done = DispatchGroup()
    private var result: Result<T, any Error>?

    init(_ work: @escaping @Sendable () throws -> T) {
        done.enter()
        DispatchQueue.global().async { [self] in
            result = Result { try work() }
            done.leave()
        }
    }

    func wait() { done.wait() }

    func get() throws -> T {
        done.wait()
        return try result!.get()
    }
}
