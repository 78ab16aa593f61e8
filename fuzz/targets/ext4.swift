// libFuzzer target: the ext2/3/4 reader (GuestFS.ExtFileSystem) on arbitrary bytes. It must
// never crash, trap, hang or allocate without bound: every malformed input is a thrown
// CairnError.
//
// Input encoding: the input is the first bytes of a 64 MiB volume; every byte past the end of
// the input reads as zero. A small real image (its superblock at 1024, descriptors, bitmaps,
// inode tables and directory blocks all sit in its first few hundred KiB) therefore survives
// being cut short, and the file system's geometry may claim the whole 64 MiB.
// fuzz/seeds.d/ext4.sh makes seeds from mke2fs images with their trailing zeros removed.
//
// Builds either way: compiled into one module together with the CairnCore and GuestFS
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzExt4(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let volume = MemoryBlockSource(Array(UnsafeRawBufferPointer(start: data, count: size)), name: "fuzz.ext4", zeroPaddedTo: 64 << 20)
    _ = ExtFileSystem.probe(volume)
    guard let fs = try? ExtFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
