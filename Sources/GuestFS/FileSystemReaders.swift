import CairnCore

extension FileSystemReader {
    /// Every file system Cairn reads, in probing order: the readers with strong signatures
    /// first (ext's magic at 1080, XFS's at 0, NTFS's OEM id), FAT's weaker boot-sector checks last.
    package static let all: [FileSystemReader] = [
        FileSystemReader(typeName: "ext", probe: ExtFileSystem.probe, open: { try ExtFileSystem(volume: $0) }),
        FileSystemReader(typeName: "xfs", probe: XFSFileSystem.probe, open: { try XFSFileSystem(volume: $0) }),
        FileSystemReader(typeName: "ntfs", probe: NTFSFileSystem.probe, open: { try NTFSFileSystem(volume: $0) }),
        FileSystemReader(typeName: "vfat", probe: FATFileSystem.probe, open: { try FATFileSystem(volume: $0) }),
    ]
}
