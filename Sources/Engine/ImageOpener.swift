import CairnCore
import DiskFormats

/// Opens a disk image as a block source.
///
/// The format is detected from the header unless forced. A qcow2 backing file is opened only
/// when the user names it: `backing` lists the chain below `path`, nearest first. A path
/// recorded inside an image is never opened on its own (untrusted-image rule).
package struct OpenedImage: Sendable {
    package var source: any BlockSource
    package var format: ImageFormat
    package var path: String
}

package enum ImageOpener {
    package static func open(path: String, format forced: ImageFormat? = nil, backing: [String] = []) throws -> OpenedImage {
        let file = try FileBlockSource(path: path)
        let format = try forced ?? ImageFormat.detect(file)
        switch format {
        case .raw:
            guard backing.isEmpty else {
                throw CairnError(.usage, "--backing was given but the image is raw, which has no backing file", path: path)
            }
            return OpenedImage(source: file, format: .raw, path: path)
        case .qcow2:
            var below: (any BlockSource)?
            if let first = backing.first {
                below = try open(path: first, format: nil, backing: Array(backing.dropFirst())).source
            }
            let image = try QCOW2Image(file: file, backing: below)
            return OpenedImage(source: image, format: .qcow2, path: path)
        case .vmdk:
            guard backing.isEmpty else {
                throw CairnError(.usage, "--backing is not supported for VMDK disks", path: path,
                                 hint: "convert the child and its parent into one image with qemu-img convert first")
            }
            // Extent files named by a descriptor are opened only as plain names in the
            // descriptor's own directory (VMDKImage refuses anything else before asking).
            let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
            let image = try VMDKImage(file: file) { name in
                guard !name.isEmpty, !name.contains("/"), name != ".", name != ".." else {
                    throw CairnError(.malformedImage, "descriptor extent '\(name)' is not a plain file name", path: path)
                }
                return try FileBlockSource(path: "\(directory)/\(name)")
            }
            return OpenedImage(source: image, format: .vmdk, path: path)
        case .vhd, .vhdx:
            var parent: (any BlockSource)?
            if let first = backing.first {
                parent = try open(path: first, format: nil, backing: Array(backing.dropFirst())).source
            }
            let image: any BlockSource = format == .vhd ? try VHDImage(file: file, parent: parent) : try VHDXImage(file: file, parent: parent)
            return OpenedImage(source: image, format: format, path: path)
        }
    }
}
