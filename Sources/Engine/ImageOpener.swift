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
        case .vmdk, .vhd, .vhdx:
            throw CairnError(.unsupported, "\(format.rawValue) images are recognized but not read yet", path: path,
                             hint: "convert with qemu-img convert -O qcow2 first")
        }
    }
}
