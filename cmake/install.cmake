# Install rules and the package files for consumers:
#   find_package(zkmem) -> zkmem::zkmem (shared) and zkmem::zkmem_static
#   pkg-config zkmem    -> -lzkmem
# Included by the top-level CMakeLists.txt after the library targets exist.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(ZKMEM_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/zkmem"
    CACHE STRING "Where zkmemConfig.cmake is installed, relative to the prefix")
set(ZKMEM_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_LIBDIR}/pkgconfig"
    CACHE STRING "Where zkmem.pc is installed, relative to the prefix")

# The names consumers see: zkmem::zkmem is the shared library (which also
# replaces malloc), zkmem::zkmem_static the archive (zk_* only).
set_target_properties(zkmem_shared PROPERTIES EXPORT_NAME zkmem)
set_target_properties(zkmem_static PROPERTIES EXPORT_NAME zkmem_static)
# The same names for projects that add zkmem with add_subdirectory().
if(NOT TARGET zkmem::zkmem)
  add_library(zkmem::zkmem ALIAS zkmem_shared)
endif()
if(NOT TARGET zkmem::zkmem_static)
  add_library(zkmem::zkmem_static ALIAS zkmem_static)
endif()

# The targets already name <prefix>/include for installed use; only another
# include directory needs adding.
set(zkmem_install_includes "")
if(NOT CMAKE_INSTALL_INCLUDEDIR STREQUAL "include")
  set(zkmem_install_includes INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
endif()
install(TARGETS zkmem_shared zkmem_static
  EXPORT zkmemTargets
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
    COMPONENT Runtime NAMELINK_COMPONENT Development
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT Development
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}" COMPONENT Runtime
  ${zkmem_install_includes})
install(FILES "${PROJECT_SOURCE_DIR}/include/zkmem.h"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}" COMPONENT Development)

# CMake package: targets, config and version files (relocatable).
install(EXPORT zkmemTargets
  NAMESPACE zkmem::
  FILE zkmemTargets.cmake
  DESTINATION "${ZKMEM_INSTALL_CMAKEDIR}" COMPONENT Development)
configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/zkmemConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/zkmemConfig.cmake"
  INSTALL_DESTINATION "${ZKMEM_INSTALL_CMAKEDIR}")
# 0.x releases may break the API between minor versions.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/zkmemConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMinorVersion)
install(FILES
  "${PROJECT_BINARY_DIR}/zkmemConfig.cmake"
  "${PROJECT_BINARY_DIR}/zkmemConfigVersion.cmake"
  DESTINATION "${ZKMEM_INSTALL_CMAKEDIR}" COMPONENT Development)

# pkg-config file. The prefix is written at install time, so that
# `cmake --install build --prefix DIR` yields a zkmem.pc that points into DIR.
set(ZKMEM_PC_LIBDIR "${CMAKE_INSTALL_LIBDIR}")
if(NOT IS_ABSOLUTE "${ZKMEM_PC_LIBDIR}")
  set(ZKMEM_PC_LIBDIR "\${exec_prefix}/${ZKMEM_PC_LIBDIR}")
endif()
set(ZKMEM_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
if(NOT IS_ABSOLUTE "${ZKMEM_PC_INCLUDEDIR}")
  set(ZKMEM_PC_INCLUDEDIR "\${prefix}/${ZKMEM_PC_INCLUDEDIR}")
endif()
set(ZKMEM_PC_PREFIX "@ZKMEM_PC_PREFIX@") # kept for the install-time pass
configure_file("${CMAKE_CURRENT_LIST_DIR}/zkmem.pc.in"
  "${PROJECT_BINARY_DIR}/zkmem.pc.in" @ONLY)
install(CODE "
  set(ZKMEM_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${PROJECT_BINARY_DIR}/zkmem.pc.in\"
    \"${PROJECT_BINARY_DIR}/zkmem.pc\" @ONLY)
" COMPONENT Development)
install(FILES "${PROJECT_BINARY_DIR}/zkmem.pc"
  DESTINATION "${ZKMEM_INSTALL_PKGCONFIGDIR}" COMPONENT Development)
