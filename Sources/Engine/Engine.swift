//  module
