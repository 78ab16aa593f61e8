import CairnCore

extension FileSystemReader {
    /// Every file system Cairn reads, in probing order.
    package static let all: [FileSystemReader] = []
}
