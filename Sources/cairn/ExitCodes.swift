import CairnCore

/// Exit statuses of `cairn` (documented in docs/CLI.md; restic's where it has one).
enum ExitStatus: Int32 {
    case success = 0
    case failure = 1
    case corruption = 3
    case repositoryNotFound = 10
    case locked = 11
    case wrongPassword = 12
    case usage = 64
    case interrupted = 130

    static func of(_ e: CairnError) -> ExitStatus {
        switch e.code {
        case .usage: .usage
        case .wrongPassword: .wrongPassword
        case .corrupt: .corruption
        case .repositoryNotFound: .repositoryNotFound
        case .locked: .locked
        case .interrupted: .interrupted
        case .notFound, .malformedImage, .unsupported, .io, .noSpace: .failure
        }
    }
}
